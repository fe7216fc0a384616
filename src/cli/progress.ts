/**
 * The progress bar long commands draw on stderr: bytes done of total (skipped zeros count as
 * done), throughput and ETA; for a pipe of unknown size, bytes and throughput only.
 * Drawn only when stderr is a terminal and --quiet is off, so scripts and logs stay clean.
 */

import type cliProgress from 'cli-progress';
import { formatBytes } from './common.js';

import type { Progress } from '../progress.js';

export interface ProgressDisplay {
  update(event: Progress): void;
  /** Removes the bar (call on success and on failure). */
  stop(): void;
}

const NONE: ProgressDisplay = { update() {}, stop() {} };

export interface ProgressOptions {
  label: string;
  quiet?: boolean;
  /** Defaults to process.stderr; tests pass a fake TTY. */
  stream?: NodeJS.WriteStream;
}

/** The display for one command; cli-progress is loaded only when a bar will be drawn. */
export async function createProgress(options: ProgressOptions): Promise<ProgressDisplay> {
  const stream = options.stream ?? process.stderr;
  if (options.quiet || !stream.isTTY) return NONE;
  const { default: bars } = await import('cli-progress');
  const started = performance.now();
  let bar: cliProgress.SingleBar | undefined;
  let knownTotal: number | undefined;
  let lastDraw = 0;

  const payload = (done: number, total: number | undefined) => {
    const seconds = (performance.now() - started) / 1000;
    const rate = seconds > 0 ? done / seconds : 0;
    const eta = total !== undefined && rate > 0 ? Math.max(0, (total - done) / rate) : undefined;
    return {
      // Names distinct from cli-progress's own tokens ({total}, {eta}…), which would win.
      doneText: formatBytes(done),
      totalText: total === undefined ? '?' : formatBytes(total),
      rateText: `${formatBytes(Math.round(rate))}/s`,
      etaText: eta === undefined ? '' : ` ETA ${formatDuration(eta)}`,
    };
  };

  const create = (total: number | undefined) => {
    knownTotal = total;
    const format =
      total === undefined
        ? `${options.label} {doneText} {rateText}`
        : `${options.label} [{bar}] {percentage}% {doneText}/{totalText} {rateText}{etaText}`;
    bar = new bars.SingleBar(
      { format, stream, hideCursor: true, clearOnComplete: true, barsize: 30, fps: 10, noTTYOutput: false },
      bars.Presets.shades_classic,
    );
    bar.start(total ?? 1, 0, payload(0, total));
  };

  return {
    update({ bytesDone, bytesTotal }) {
      if (!bar || knownTotal !== bytesTotal) {
        bar?.stop();
        create(bytesTotal);
      }
      const now = performance.now();
      if (now - lastDraw < 100 && bytesDone !== bytesTotal) return;
      lastDraw = now;
      bar!.update(bytesTotal === undefined ? 0 : bytesDone, payload(bytesDone, bytesTotal));
    },
    stop() {
      bar?.stop();
      bar = undefined;
    },
  };
}

function formatDuration(seconds: number): string {
  if (seconds < 60) return `${Math.ceil(seconds)}s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes}m${String(Math.ceil(seconds % 60)).padStart(2, '0')}s`;
  return `${Math.floor(minutes / 60)}h${String(minutes % 60).padStart(2, '0')}m`;
}
