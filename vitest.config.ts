import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['virtio/**/*.test.ts', 'backend/**/*.test.ts', 'test/**/*.test.ts', 'guest-driver-tests/**/*.test.ts'],
    // VM tests boot real QEMU under TCG; they run one at a time and need room.
    testTimeout: 60_000,
    hookTimeout: 120_000,
    globalSetup: ['test/global-setup.ts'],
    pool: 'forks',
    reporters: ['default'],
  },
});
