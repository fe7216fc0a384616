/**
 * What every command shares: exit codes, size parsing, error printing, JSON output, and the
 * AbortSignal that Ctrl-C and SIGTERM trigger.
 */

import { InvalidArgumentError as CommanderInvalidArgument } from 'commander';
import { AbortedError, isQcow2StreamError } from '../errors.js';

export const ExitCode = {
  OK: 0,
  /** Differences (compare) or findings (check). */
  FINDINGS: 1,
  ERROR: 2,
  /** 128 + SIGINT, as shells expect. */
  INTERRUPTED: 130,
  TERMINATED: 143,
} as const;

const UNITS: Record<string, number> = {
  '': 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/**
 * Parses `512`, `512B`, `64K`, `20G`, `1.5T`, `4KiB`, `2MB` (binary units, like qemu-img; case
 * does not matter). The result must be a whole number of bytes.
 * Throws commander's InvalidArgumentError so the message lands next to the option name.
 */
export function parseSize(text: string): number {
  // A unit letter, optionally followed by `B` or `iB`; or a bare `B` for bytes.
  const match = /^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtpe])(?:i?b)?|b)?\s*$/i.exec(text);
  if (!match) throw new CommanderInvalidArgument(`'${text}' is not a size (examples: 512, 64K, 20G, 1.5T)`);
  const value = Number(match[1]) * (UNITS[(match[2] ?? '').toLowerCase()] ?? 1);
  if (!Number.isSafeInteger(value)) throw new CommanderInvalidArgument(`'${text}' is not a whole number of bytes below 2^53`);
  return value;
}

/** --max-chain-depth N: images a backing chain may hold (every reader's limit, and convert --base's). */
export const MAX_CHAIN_DEPTH_OPTION = ['--max-chain-depth <n>', 'most images a backing chain may hold, the top one included (default 128)'] as const;

export function parseChainDepth(text: string): number {
  const value = parseInteger(text);
  if (value < 1) throw new CommanderInvalidArgument(`'${text}': a chain holds at least 1 image`);
  return value;
}

export function parseInteger(text: string): number {
  const value = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(value)) throw new CommanderInvalidArgument(`'${text}' is not a whole number`);
  return value;
}

let stdoutGuarded = false;

/**
 * Writes text to stdout. A reader that goes away (`qcow2-stream map img | head`) ends the
 * program quietly, as for any Unix filter, instead of an EPIPE stack trace.
 */
export function writeStdout(text: string): void {
  if (!stdoutGuarded) {
    stdoutGuarded = true;
    process.stdout.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EPIPE') process.exit(process.exitCode ?? ExitCode.OK);
      process.stderr.write(`qcow2-stream: cannot write to standard output: ${err.message}\n`);
      process.exit(ExitCode.ERROR);
    });
  }
  process.stdout.write(text);
}

/** Writes one JSON document to stdout. */
export function printJson(value: unknown): void {
  writeStdout(`${JSON.stringify(value, null, 2)}\n`);
}

/**
 * Prints a command's summary: JSON with --json (to stderr when stdout carries the image itself,
 * so the two never mix), else the human description on stderr unless --quiet.
 */
export function reportSummary(
  summary: unknown,
  flags: { json?: boolean | undefined; quiet?: boolean | undefined },
  stdoutCarriesImage: boolean,
  describe: () => string,
): void {
  if (flags.json) {
    if (stdoutCarriesImage) process.stderr.write(`${JSON.stringify(summary, null, 2)}\n`);
    else printJson(summary);
  } else if (!flags.quiet) {
    process.stderr.write(`${describe()}\n`);
  }
}

/**
 * The warnings of a run, printed once it has succeeded: a failed command's standard error is
 * its error line and at most one hint line, nothing else (the README's error contract).
 */
const pendingWarnings: string[] = [];

/** An onWarning callback for the readers and convert: the message waits for the run's end. */
export function deferWarning(message: string): void {
  if (!pendingWarnings.includes(message)) pendingWarnings.push(message);
}

/** Prints the run's warnings (the command succeeded); called by {@link action}. */
export function flushWarnings(): void {
  for (const message of pendingWarnings.splice(0)) process.stderr.write(`qcow2-stream: warning: ${oneLine(message)}\n`);
}

/** Newlines in a message (a file name can hold one) would break the one-line contract. */
function oneLine(text: string): string {
  return text.replace(/[\r\n]+/g, ' ');
}

/**
 * Prints the error line (`qcow2-stream: MESSAGE [CODE]`) and at most one hint line to stderr;
 * no stack trace unless QCOW2_STREAM_DEBUG=1. Deferred warnings are dropped: the error says it.
 */
export function reportError(err: unknown): number {
  const debug = process.env['QCOW2_STREAM_DEBUG'] === '1';
  pendingWarnings.length = 0;
  if (isQcow2StreamError(err)) {
    process.stderr.write(`qcow2-stream: ${oneLine(err.message)} [${err.code}]\n`);
    if (err.hint) process.stderr.write(`  hint: ${oneLine(err.hint)}\n`);
    if (debug) process.stderr.write(`${err.stack ?? ''}\n`);
    if (err instanceof AbortedError) return interruptExitCode ?? ExitCode.ERROR;
    return ExitCode.ERROR;
  }
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`qcow2-stream: internal error: ${oneLine(message)}\n`);
  process.stderr.write(debug && err instanceof Error ? `${err.stack ?? ''}\n` : '  hint: this is a bug; rerun with QCOW2_STREAM_DEBUG=1 and report the stack trace\n');
  return ExitCode.ERROR;
}

let interruptExitCode: number | undefined;
const controller = new AbortController();

/** Aborted on the first SIGINT or SIGTERM; a second signal exits at once. */
export function processSignal(): AbortSignal {
  if (!installed) installSignalHandlers();
  return controller.signal;
}

let installed = false;
function installSignalHandlers(): void {
  installed = true;
  const onSignal = (name: 'SIGINT' | 'SIGTERM', code: number) => () => {
    if (controller.signal.aborted) process.exit(code);
    interruptExitCode = code;
    controller.abort(new AbortedError(`Interrupted by ${name}`));
  };
  process.on('SIGINT', onSignal('SIGINT', ExitCode.INTERRUPTED));
  process.on('SIGTERM', onSignal('SIGTERM', ExitCode.TERMINATED));
}

/**
 * Runs a command body and turns its outcome into an exit code. Bodies return an exit code
 * (0 or 1) or throw; nothing escapes as a stack trace.
 */
export function action<A extends unknown[]>(body: (...args: A) => Promise<number | void>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    let code: number;
    try {
      code = (await body(...args)) ?? ExitCode.OK;
      flushWarnings();
    } catch (err) {
      code = reportError(err);
    }
    // After Ctrl-C the outputs are already cleaned up; do not wait for the event loop to drain
    // (a FIFO still waiting for its writer, a write to a pipe nobody reads).
    if (code === ExitCode.INTERRUPTED || code === ExitCode.TERMINATED) process.exit(code);
    process.exitCode = code;
  };
}

/** Human-readable byte count: 1.5 GiB. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}
