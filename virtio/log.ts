/**
 * Leveled, one-line-per-event logging with the object named in a prefix
 * ("vq 3", "qpn 0x11"). Writes to stderr so stdout stays free for tools.
 */
export type LogLevel = 'error' | 'warn' | 'info' | 'debug' | 'trace';

const ORDER: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3, trace: 4 };

export function isLogLevel(s: string): s is LogLevel {
  return Object.prototype.hasOwnProperty.call(ORDER, s);
}

export type LogSink = (line: string) => void;

export class Logger {
  constructor(
    private readonly level: LogLevel = 'info',
    private readonly scope = '',
    private readonly sink: LogSink = (line) => process.stderr.write(line + '\n'),
  ) {}

  child(scope: string): Logger {
    return new Logger(this.level, this.scope ? `${this.scope} ${scope}` : scope, this.sink);
  }

  enabled(level: LogLevel): boolean {
    return ORDER[level] <= ORDER[this.level];
  }

  error(msg: string): void {
    this.write('error', msg);
  }
  warn(msg: string): void {
    this.write('warn', msg);
  }
  info(msg: string): void {
    this.write('info', msg);
  }
  debug(msg: string): void {
    this.write('debug', msg);
  }
  trace(msg: string): void {
    this.write('trace', msg);
  }

  private write(level: LogLevel, msg: string): void {
    if (!this.enabled(level)) return;
    const ts = new Date().toISOString();
    this.sink(`${ts} ${level.toUpperCase().padEnd(5)} ${this.scope ? `[${this.scope}] ` : ''}${msg}`);
  }
}
