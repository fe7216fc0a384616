/**
 * Pipe I/O at the kernel's speed, through the optional addon (src/native, Linux): reads that
 * fill a whole large buffer per trip and writes that hand over a whole buffer, on the thread
 * pool, each waiting in poll() on the pipe and on an eventfd (the canceller) rather than
 * blocked in read()/write(). Cancelling signals the eventfd: the waiting thread returns at once,
 * so Ctrl-C, an AbortSignal or a closed writer end the run instead of leaving a thread the
 * process cannot exit past. The pipe is enlarged with F_SETPIPE_SZ where the kernel allows, so
 * a writer such as `cat` fills more per wake-up.
 *
 * Without the addon (or off Linux) these return undefined and callers keep their event-loop
 * paths; the bytes are the same either way.
 */

import { closeSync, fstatSync } from 'node:fs';
import { AbortedError, fileError } from '../errors.js';
import { nativeAddon, withErrnoCode, type NativeAddon } from './native.js';

/** The pipe size asked for with F_SETPIPE_SZ (unprivileged processes get up to pipe-max-size, 1 MiB by default). */
export const PIPE_SIZE = 1024 * 1024;

type PipeAddon = Required<Pick<NativeAddon, 'readFull' | 'writeFull' | 'createCanceller' | 'signalCanceller' | 'setPipeSize'>> & Pick<NativeAddon, 'spliceFile'>;

/** The addon's pipe functions, or undefined when the addon (or this part of it) is absent or disabled. */
function pipeAddon(): PipeAddon | undefined {
  const addon = nativeAddon();
  if (!addon?.readFull || !addon.writeFull || !addon.createCanceller || !addon.signalCanceller || !addon.setPipeSize) return undefined;
  return addon as PipeAddon;
}

/** Whether native pipe I/O is available (the addon is built for Linux and not disabled). */
export function nativePipeIoAvailable(): boolean {
  return pipeAddon() !== undefined;
}

/** Whether `fd` is a pipe, FIFO or socket: the descriptors native pipe I/O serves. */
export function isPipeLike(fd: number): boolean {
  try {
    const stats = fstatSync(fd);
    return stats.isFIFO() || stats.isSocket();
  } catch {
    return false;
  }
}

/** A descriptor with native, cancellable I/O: the common part of the reader and the writer. */
class PipeChannel {
  private readonly canceller: number;
  private inflight: Promise<unknown> = Promise.resolve();
  private cancelled = false;
  private closing: Promise<void> | undefined;

  constructor(
    protected readonly addon: PipeAddon,
    protected readonly fd: number,
    /** Name for messages. */
    readonly name: string,
    private readonly ownsFd: boolean,
  ) {
    this.canceller = addon.createCanceller();
    // Best effort: a larger pipe means fewer wake-ups per megabyte on both sides.
    try {
      addon.setPipeSize(fd, PIPE_SIZE);
    } catch {
      // Not a pipe (a socket), or not allowed: the default size works, only with more trips.
    }
  }

  /** Runs one native call; a cancelled one rejects with an AbortedError, others with a FileError. */
  protected async run(op: (efd: number) => Promise<number>, verb: string): Promise<number> {
    if (this.cancelled) throw new AbortedError(`The ${verb} of ${this.name} was cancelled`);
    const call = op(this.canceller);
    this.inflight = call.catch(() => {});
    try {
      return await call;
    } catch (err) {
      const cause = withErrnoCode(err);
      if ((cause as { code?: unknown }).code === 'ECANCELED') throw new AbortedError(`The ${verb} of ${this.name} was cancelled`);
      throw fileError(cause, verb, this.name);
    }
  }

  /** Wakes a call waiting on the pipe (it rejects with an AbortedError), and every later one. */
  cancel(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    this.addon.signalCanceller(this.canceller);
  }

  /**
   * Cancels what is pending and releases the descriptors once no thread can touch them (a
   * descriptor closed under a pending call could be reused by another file before it runs).
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      this.cancel();
      await this.inflight;
      closeSync(this.canceller);
      if (this.ownsFd) {
        try {
          closeSync(this.fd);
        } catch {
          // Already gone.
        }
      }
    })();
    return this.closing;
  }
}

/** Full-buffer reads from a pipe, FIFO or socket (see the module comment). */
export class NativePipeReader extends PipeChannel {
  /** Fills `buffer[offset, offset + length)`; fewer bytes only at the end of the input (0: at its end). */
  read(buffer: Uint8Array, offset: number, length: number): Promise<number> {
    return this.run((efd) => this.addon.readFull(this.fd, buffer, offset, length, efd), 'read');
  }
}

/** Whole-buffer writes to a pipe, FIFO or socket (see the module comment). */
export class NativePipeWriter extends PipeChannel {
  /** Writes all of `chunk`; an EPIPE (the reader went away) is a FileError. */
  async write(chunk: Uint8Array): Promise<void> {
    if (chunk.length === 0) return;
    await this.run((efd) => this.addon.writeFull(this.fd, chunk, 0, chunk.length, efd), 'write to');
  }

  /** Whether {@link spliceFrom} works: the addon has splice and the descriptor is a pipe or FIFO (splice(2) needs one end to be a pipe). */
  get canSplice(): boolean {
    if (this.addon.spliceFile === undefined) return false;
    try {
      return fstatSync(this.fd).isFIFO();
    } catch {
      return false;
    }
  }

  /**
   * Moves `length` bytes of a regular file (or block device) at `position` into the pipe
   * without copying them through our memory; resolves with the bytes moved (fewer only where
   * the file ends). A file system that cannot splice fails with a FileError whose systemCode is EINVAL.
   */
  spliceFrom(source: { fd: number; name: string }, position: number, length: number): Promise<number> {
    const splice = this.addon.spliceFile!;
    return this.run((efd) => splice(source.fd, position, this.fd, length, efd), 'write to');
  }
}

/**
 * A native reader over `fd` (a pipe, FIFO or socket), or undefined without the addon. With
 * `ownsFd` the descriptor is closed by close().
 */
export function nativePipeReader(fd: number, name: string, options: { ownsFd: boolean }): NativePipeReader | undefined {
  const addon = pipeAddon();
  return addon && isPipeLike(fd) ? new NativePipeReader(addon, fd, name, options.ownsFd) : undefined;
}

/** A native writer over `fd` (a pipe, FIFO or socket), or undefined without the addon. */
export function nativePipeWriter(fd: number, name: string, options: { ownsFd: boolean }): NativePipeWriter | undefined {
  const addon = pipeAddon();
  return addon && isPipeLike(fd) ? new NativePipeWriter(addon, fd, name, options.ownsFd) : undefined;
}
