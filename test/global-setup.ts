/**
 * Compiles the TypeScript once per test run, so tests that start `vrdma` as
 * a child process run the code under test and not a stale build. Type
 * errors are reported here but do not stop the run: tsc still emits, and
 * `npm test` has already failed on them in scripts/setup.sh.
 */
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export default function setup(): void {
  const root = join(dirname(fileURLToPath(import.meta.url)), '..');
  const r = spawnSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(root, 'tsconfig.json')], { encoding: 'utf8' });
  if (r.status !== 0) process.stderr.write(`[global-setup] tsc reported errors (the build was still emitted):\n${r.stdout}${r.stderr}`);
}
