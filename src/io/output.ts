/**
 * An output addressed by byte offset, the sink shared by the data file, the metadata file and
 * raw export:
 *
 * - a regular file takes positional writes in any order; ranges never written stay holes, and
 *   `finish(length)` sets the final length (a sparse tail costs nothing);
 * - a stream (pipe, terminal, character device, a Node Writable) takes writes in increasing
 *   offset order; gaps and the tail are filled with real zeros.
 *
 * Files are written under a temporary name in the same directory and renamed by `commit()`,
 * so a failed run never leaves an output that looks valid; `abort()` removes the temporary.
 * By default `commit()` is durable: the file is fsynced before the rename and its directory
 * after it, so once commit() resolves the output survives a crash or power loss.
 *
 * An `s3://bucket/key` target is a stream output too: a multipart upload (src/io/s3.ts) that
 * appears under its key only at commit() and is aborted by abort().
 */

import { link, lstat, open, readdir, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { read as fsRead, readSync, write as fsWrite } from 'node:fs';
import { constants as osConstants } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { fileError, FileError, streamError, type SystemErrorFacts } from '../errors.js';
import { kindOf } from './files.js';
import { allocIoBuffer, zeroBuffer } from './buffers.js';
import { nativeAddon, withErrnoCode } from './native.js';
import { nativePipeWriter } from './pipe.js';
import { isS3Uri } from './s3-uri.js';

/**
 * Native copies ({@link OffsetWriter.copyClustersFrom}) a writer keeps in flight, one per thread
 * of libuv's default pool: while one copy waits for the data file's write lock, the others read
 * and check. 2 MiB copies on the mixed 2 GiB image: 0.57-0.60 s with 4, 0.70-0.71 s with 2.
 */
export const COPIES_IN_FLIGHT = 4;

/** A regular file the native data mover reads from (see {@link OffsetWriter.copyClustersFrom}). */
export interface CopySource {
  /** An open descriptor of a regular file; the caller keeps it open until the copy settles. */
  fd: number;
  /** Its name, for messages. */
  name: string;
}

/** Where an output goes: a path, `s3://bucket/key`, `'-'` for standard output, or a Node Writable. */
export type OutputTarget = string | Writable;

/** Options of {@link OffsetWriter.create}. */
export interface OutputOptions {
  /** What this output is, for messages: `metadata file`, `data file`, `raw image`. */
  label: string;
  /**
   * Replace an existing regular file at the path. Default false: one rule for every output of
   * every command (the CLI's --force). With false, a file that appears at the path while the
   * output is being written is not replaced either: commit() fails with EEXIST.
   */
  overwrite?: boolean;
  /**
   * Regular files: fsync the file before its rename and its directory after, so commit()
   * resolves only once the output is on stable storage. Default true. Streams have nothing
   * to fsync.
   */
  sync?: boolean;
  /**
   * The output's final size, when known: an `s3://` output picks its part size from it, so
   * that 10,000 parts suffice (unknown: 16 MiB parts, at most 156 GiB).
   */
  sizeHint?: number | undefined;
}

/** Sequential byte sink underneath a stream output. */
interface SequentialSink {
  /** Writes all of `chunk`; the caller may reuse it once the promise settles. */
  write(chunk: Uint8Array): Promise<void>;
  /**
   * Each write is a round trip to another thread (a descriptor written on the thread pool or
   * the addon's pipe thread) and does not keep `chunk`: OffsetWriter copies small chunks into
   * one write. (A Writable keeps references to its chunks, so it gets them as they are.)
   */
  coalesceWrites?: boolean;
  /**
   * A pipe written through the addon: moves file bytes into it with splice(2), no copy through
   * our memory. Resolves with the bytes moved (fewer only where the file ends).
   */
  spliceFrom?(source: CopySource, position: number, length: number): Promise<number>;
  /** Ends the output; for an object, this is when it appears under its key. */
  close(): Promise<void>;
  /** Wakes a write blocked on a full pipe (it then fails): abort() calls it first. */
  cancel?(): void;
  /** Drops a failed output (an object's multipart upload is aborted); without it, close(). */
  abort?(): Promise<void>;
}

const ZERO_CHUNK = 1024 * 1024;
/** The most a stream write copies together (see OffsetWriter.coalescedWrite). */
const COALESCE_BYTES = 4 * 1024 * 1024;

/**
 * The one output abstraction: positional writes in any order on a regular file (gaps stay
 * holes, `finish(length)` sets the size), or in-order writes on a pipe, stdout or Writable
 * (gaps are filled with zeros). A file is created under a temporary name
 * (`.name.XXXX.partial`), moved into place by `commit()` and removed by `abort()`.
 */
export class OffsetWriter {
  /** `file`: positional, holes allowed. `stream`: sequential, zeros written out. */
  readonly kind: 'file' | 'stream';
  /** The final path ('-' for stdout, undefined for a Writable). */
  readonly path: string | undefined;
  /** What this output is, for messages (`data file`, `metadata file`…). */
  readonly label: string;
  /** Bytes handed to the OS, zeros written to streams included. */
  bytesWritten = 0;
  /** Next offset a stream expects; for files, the highest end written so far. */
  private position = 0;
  private finished = false;
  private closed = false;

  private constructor(
    kind: 'file' | 'stream',
    path: string | undefined,
    label: string,
    private readonly handle: FileHandle | undefined,
    private readonly tempPath: string | undefined,
    private readonly sink: SequentialSink | undefined,
    private readonly sync: boolean,
    private readonly replace: boolean,
  ) {
    this.kind = kind;
    this.path = path;
    this.label = label;
  }

  /** Opens an output. A regular-file path is written through a temporary name until commit(). */
  static async create(target: OutputTarget, options: OutputOptions): Promise<OffsetWriter> {
    // One rule for every output: nothing is replaced unless asked (undefined is false, as documented).
    const overwrite = options.overwrite ?? false;
    if (typeof target !== 'string') {
      return new OffsetWriter('stream', undefined, options.label, undefined, undefined, writableSink(target, options.label), false, true);
    }
    if (isS3Uri(target)) {
      // Loaded only when an object is written: the AWS SDK stays out of plain conversions.
      const { S3UploadSink } = await import('./s3.js');
      const sink = await S3UploadSink.open(target, { overwrite, sizeHint: options.sizeHint });
      return new OffsetWriter('stream', target, options.label, undefined, undefined, sink, false, overwrite);
    }
    if (target === '-') {
      return new OffsetWriter('stream', '-', options.label, undefined, undefined, fdSink(1, 'standard output'), false, true);
    }
    let existing;
    try {
      existing = await stat(target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw fileError(err, 'inspect', target);
    }
    if (existing && kindOf(existing) === 'directory') {
      throw new FileError(`Cannot write the ${options.label} '${target}': it is a directory`, target, systemError('EISDIR'));
    }
    if (existing && kindOf(existing) !== 'file') {
      // A FIFO, terminal or device: write to it in place, sequentially.
      let handle: FileHandle;
      try {
        handle = await open(target, 'w');
      } catch (err) {
        throw fileError(err, 'open', target);
      }
      return new OffsetWriter('stream', target, options.label, handle, undefined, fdSink(handle.fd, target), false, true);
    }
    if (existing && !overwrite) {
      throw new FileError(`The ${options.label} '${target}' already exists`, target, {
        ...systemError('EEXIST'),
        hint: 'Remove it first, or replace it with --force (overwrite: true in the API)',
      });
    }
    await removeStalePartials(target);
    const tempPath = partialPath(target);
    let handle: FileHandle;
    try {
      handle = await open(tempPath, 'wx+', existing ? existing.mode & 0o777 : 0o644);
    } catch (err) {
      throw fileError(err, 'create', target);
    }
    return new OffsetWriter('file', target, options.label, handle, tempPath, undefined, options.sync ?? true, overwrite);
  }

  /** Writes `data` at `offset`. Streams need offset ≥ every earlier write's end (gaps become zeros). */
  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.writev(offset, [data]);
  }

  /** Writes contiguous chunks starting at `offset` in one call where the OS allows. */
  async writev(offset: number, chunks: readonly Uint8Array[]): Promise<void> {
    const length = chunks.reduce((n, c) => n + c.length, 0);
    if (length === 0) return;
    if (this.handle && this.kind === 'file') {
      try {
        let done = 0;
        let list = chunks as Uint8Array[];
        // writev may write less than asked (rare on files); finish the rest.
        while (done < length) {
          const { bytesWritten } = await this.handle.writev(list as NodeJS.ArrayBufferView[] as Buffer[], offset + done);
          done += bytesWritten;
          if (done < length) list = remainder(chunks, done);
        }
      } catch (err) {
        throw fileError(err, `write the ${this.label}`, this.path ?? '');
      }
      this.bytesWritten += length;
      this.position = Math.max(this.position, offset + length);
      return;
    }
    await this.zeroFillTo(offset);
    if (chunks.length === 1 || !this.coalesces) {
      for (const chunk of chunks) await this.sinkWrite(chunk);
    } else {
      await this.coalescedWrite(chunks);
    }
    this.position = offset + length;
  }

  /** Staging for {@link coalescedWrite}, grown on demand up to COALESCE_BYTES. */
  private staging: Buffer | undefined;

  /**
   * One round trip per 64 KiB cluster made a 2 GiB single-file image to a pipe wait ~1.5 s in
   * thread handoffs: where the sink allows, small chunks are copied into one write instead.
   */
  private get coalesces(): boolean {
    return this.sink?.coalesceWrites === true;
  }

  private async coalescedWrite(chunks: readonly Uint8Array[]): Promise<void> {
    let used = 0;
    for (const chunk of chunks) {
      if (chunk.length >= COALESCE_BYTES) {
        if (used > 0) await this.sinkWrite(this.staging!.subarray(0, used));
        used = 0;
        await this.sinkWrite(chunk);
        continue;
      }
      if (used + chunk.length > COALESCE_BYTES) {
        await this.sinkWrite(this.staging!.subarray(0, used));
        used = 0;
      }
      if (!this.staging || this.staging.length < used + chunk.length) {
        const grown = allocIoBuffer(Math.min(COALESCE_BYTES, Math.max(2 * (used + chunk.length), 256 * 1024)));
        if (this.staging && used > 0) grown.set(this.staging.subarray(0, used));
        this.staging = grown;
      }
      this.staging.set(chunk, used);
      used += chunk.length;
    }
    if (used > 0) await this.sinkWrite(this.staging!.subarray(0, used));
  }

  /**
   * Whether {@link copyClustersFrom} works here: a regular-file output and the native addon
   * built (and not disabled with QCOW2_STREAM_NO_NATIVE).
   */
  get canCopyClusters(): boolean {
    return this.kind === 'file' && this.handle !== undefined && nativeAddon() !== null;
  }

  /**
   * Copies `length` bytes (at most 16 MiB) of a regular file, from `sourceOffset`, to `offset`
   * in this output, leaving out the clusters that are all zeros: they stay holes. Read, zero
   * check and write run on one thread-pool thread in native code, without a round trip through
   * JavaScript per cluster. Sets `flags[i]` to 1 for each zero cluster and 0 for each cluster
   * written; resolves with the bytes read (fewer than `length` when the source ended: only
   * those were copied). Only where {@link canCopyClusters}; several copies may run at once.
   */
  async copyClustersFrom(source: CopySource, sourceOffset: number, offset: number, length: number, clusterSize: number, flags: Uint8Array): Promise<number> {
    const addon = nativeAddon();
    if (!addon || !this.handle || this.kind !== 'file') throw new RangeError(`${this.label}: clusters can only be copied natively into a file output`);
    let bytesRead: number;
    try {
      bytesRead = await addon.copyClusters(source.fd, sourceOffset, this.handle.fd, offset, length, clusterSize, flags);
    } catch (err) {
      const { syscall } = err as { syscall?: string };
      const cause = withErrnoCode(err);
      throw syscall === 'read' ? fileError(cause, 'read', source.name) : fileError(cause, `write the ${this.label}`, this.path ?? '');
    }
    let end = 0;
    for (let i = 0, at = 0; at < bytesRead; i++, at += clusterSize) {
      if (flags[i]) continue;
      end = Math.min(bytesRead, at + clusterSize);
      this.bytesWritten += end - at;
    }
    this.position = Math.max(this.position, offset + end);
    return bytesRead;
  }

  /**
   * Whether {@link copyFrom} hands the source's pages to this output without copying them: a
   * pipe or FIFO written through the addon (splice(2)). Elsewhere copyFrom reads and writes.
   */
  get canSplice(): boolean {
    return this.kind === 'stream' && this.sink?.spliceFrom !== undefined && !this.spliceRefused;
  }

  private spliceRefused = false;

  /**
   * Writes `length` bytes of a regular file or block device, from `sourceOffset`, at `offset`
   * of this stream output (gaps before it become zeros). Spliced where {@link canSplice};
   * otherwise, and where the file system cannot splice, read and written through a buffer.
   * Resolves with the bytes copied: fewer than `length` only where the source ends.
   */
  async copyFrom(source: CopySource, sourceOffset: number, offset: number, length: number): Promise<number> {
    if (this.kind !== 'stream') throw new RangeError(`${this.label}: copyFrom writes stream outputs (files take copyClustersFrom)`);
    await this.zeroFillTo(offset);
    let moved = 0;
    if (this.canSplice) {
      try {
        moved = await this.sink!.spliceFrom!(source, sourceOffset, length);
      } catch (err) {
        // A file system without splice support (some FUSE and network ones): copy instead.
        if (!(err instanceof FileError) || err.systemCode !== 'EINVAL') throw err;
        this.spliceRefused = true;
      }
    }
    if (!this.canSplice) moved = await this.readAndWrite(source, sourceOffset, length);
    this.bytesWritten += moved;
    this.position = offset + moved;
    return moved;
  }

  /** copyFrom without splice: through the staging buffer, COALESCE_BYTES at a time. */
  private async readAndWrite(source: CopySource, sourceOffset: number, length: number): Promise<number> {
    if (!this.staging || this.staging.length < COALESCE_BYTES) this.staging = allocIoBuffer(COALESCE_BYTES);
    let done = 0;
    while (done < length) {
      const want = Math.min(COALESCE_BYTES, length - done);
      const got = await readFd(source, this.staging, want, sourceOffset + done);
      if (got === 0) break;
      // sinkWrite counts bytesWritten itself; copyFrom counts what it moved.
      await this.sink!.write(this.staging.subarray(0, got));
      done += got;
    }
    return done;
  }

  /** Sets the final length: holes (files) or zeros (streams) up to it. Call once, last. */
  async finish(length: number): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    if (this.handle && this.kind === 'file') {
      try {
        await this.handle.truncate(length);
      } catch (err) {
        throw fileError(err, `set the length of the ${this.label}`, this.path ?? '');
      }
      this.position = length;
      return;
    }
    await this.zeroFillTo(length);
  }

  /**
   * Closes the output and moves a file to its final name: fsync (unless `sync: false`), close,
   * rename, fsync of the directory. On failure nothing is left: not the temporary file, and
   * not the final name either if the failure came after the rename (a directory fsync error).
   */
  async commit(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    let placed = false;
    try {
      // Before the rename: the name must never point at data that is not on disk yet.
      if (this.sync && this.handle) await this.handle.sync();
      await this.sink?.close();
      await this.handle?.close();
      if (this.tempPath && this.path) {
        const linked = await this.place(this.tempPath, this.path);
        placed = true;
        if (linked) await unlink(this.tempPath);
        // After it: the rename itself is a change of the directory.
        if (this.sync) await syncDirectory(dirname(this.path));
      }
    } catch (err) {
      await this.handle?.close().catch(() => {});
      await this.removeTemp();
      if (placed && this.path) await unlink(this.path).catch(() => {});
      throw fileError(err, `finish the ${this.label}`, this.path ?? '');
    }
  }

  /**
   * Gives the temporary file its final name; true when that was a hard link (the temporary
   * name is then still to be removed). Without `overwrite` a hard link does it, which
   * fails if the name was taken meanwhile (rename would silently replace that file: say a
   * second job writing the same data file); filesystems without hard links fall back to a
   * check and a rename.
   */
  private async place(tempPath: string, path: string): Promise<boolean> {
    if (this.replace) {
      await rename(tempPath, path);
      return false;
    }
    try {
      await link(tempPath, path);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') throw err;
      if ((await stat(path).catch(() => undefined)) !== undefined) {
        throw Object.assign(new Error(`'${path}' appeared while it was being written`), { code: 'EEXIST' });
      }
      await rename(tempPath, path);
      return false;
    }
    return true;
  }

  /**
   * Wakes a write blocked on a full pipe, which then fails (an AbortedError): for a caller that
   * must stop at once while writes are still pending (abort() does this itself).
   */
  cancel(): void {
    this.sink?.cancel?.();
  }

  /**
   * Removes an output that commit() put in place, when a later step of the same run failed (the
   * data file of an image whose metadata could not be written). Files and objects only; never throws.
   */
  async discard(): Promise<void> {
    if (!this.closed || !this.path || this.path === '-') return;
    if (isS3Uri(this.path)) {
      const { deleteObject } = await import('./s3.js');
      await deleteObject(this.path).catch(() => {});
    } else if (this.kind === 'file') {
      await unlink(this.path).catch(() => {});
    }
  }

  /** Closes the output after a failure; a temporary file is removed, an upload aborted. Never throws. */
  async abort(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.sink?.cancel?.();
    await (this.sink?.abort ? this.sink.abort() : this.sink?.close())?.catch(() => {});
    await this.handle?.close().catch(() => {});
    await this.removeTemp();
  }

  /**
   * Reads back bytes already written (regular files only): sinks that share clusters confirm a
   * fingerprint match against what they stored, and patch tables they wrote. Synchronous: what
   * was just written is in the page cache, and a thread-pool round trip per read cost more than
   * the read. Unwritten ranges read as zeros. With `into`, the bytes land in (a view of) it.
   */
  readAtSync(offset: number, length: number, into?: Uint8Array): Uint8Array {
    if (!this.handle || this.kind !== 'file') throw new RangeError(`${this.label}: only a file output can be read back`);
    // A reused, page-placed buffer (allocIoBuffer) reads several times faster than a fresh one.
    const out = into && into.length >= length ? into.subarray(0, length) : new Uint8Array(length);
    let done = 0;
    while (done < length) {
      let bytesRead: number;
      try {
        bytesRead = readSync(this.handle.fd, out, done, length - done, offset + done);
      } catch (err) {
        throw fileError(err, `read back the ${this.label}`, this.path ?? '');
      }
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    out.fill(0, done);
    return out;
  }

  private async removeTemp(): Promise<void> {
    if (this.tempPath) await unlink(this.tempPath).catch(() => {});
  }

  private async zeroFillTo(offset: number): Promise<void> {
    if (offset < this.position) {
      throw new RangeError(`${this.label}: a stream output cannot go back from ${this.position} to ${offset}`);
    }
    while (this.position < offset) {
      const n = Math.min(ZERO_CHUNK, offset - this.position);
      await this.sinkWrite(zeroBuffer(ZERO_CHUNK).subarray(0, n));
      this.position += n;
    }
  }

  private async sinkWrite(chunk: Uint8Array): Promise<void> {
    if (!this.sink) throw new Error('unreachable: stream output without a sink');
    await this.sink.write(chunk);
    this.bytesWritten += chunk.length;
  }
}

function remainder(chunks: readonly Uint8Array[], skip: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const chunk of chunks) {
    if (skip >= chunk.length) {
      skip -= chunk.length;
      continue;
    }
    out.push(skip > 0 ? chunk.subarray(skip) : chunk);
    skip = 0;
  }
  return out;
}

/**
 * Sequential writes to a descriptor. A pipe, FIFO or socket goes through the addon's
 * cancellable whole-buffer writes where it is built (src/io/pipe.ts); otherwise, and for
 * terminals and devices, fs.write on the thread pool: a full pipe makes the promise wait.
 */
function fdSink(fd: number, name: string): SequentialSink {
  const native = nativePipeWriter(fd, name, { ownsFd: false });
  if (native) {
    return {
      write: (chunk) => native.write(chunk),
      ...(native.canSplice ? { spliceFrom: (source: CopySource, position: number, length: number) => native.spliceFrom(source, position, length) } : {}),
      coalesceWrites: true,
      // The descriptor belongs to the caller (stdout) or to the OffsetWriter's handle.
      close: () => native.close(),
      cancel: () => native.cancel(),
    };
  }
  return eventLoopFdSink(fd, name);
}

/** One fs.read of a copy source on the thread pool: the bytes read (0 at its end). */
function readFd(source: CopySource, buffer: Uint8Array, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fsRead(source.fd, buffer, 0, length, position, (err, bytesRead) => (err ? reject(fileError(err, 'read', source.name)) : resolve(bytesRead)));
  });
}

/** fs.write on the thread pool; EAGAIN (a non-blocking pipe that is full) waits and retries. */
function eventLoopFdSink(fd: number, name: string): SequentialSink {
  const writeOnce = (chunk: Uint8Array, offset: number) =>
    new Promise<number>((resolve, reject) => {
      fsWrite(fd, chunk, offset, chunk.length - offset, null, (err, written) => (err ? reject(err) : resolve(written)));
    });
  return {
    coalesceWrites: true,
    async write(chunk) {
      let done = 0;
      let waitMs = 1;
      while (done < chunk.length) {
        try {
          done += await writeOnce(chunk, done);
          waitMs = 1;
        } catch (err) {
          // A descriptor shared with a non-blocking pipe (Node makes process.stdout's pipe
          // non-blocking once anything touches it) reports a full pipe as EAGAIN: wait, retry.
          if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw fileError(err, 'write to', name);
          await new Promise((resolve) => setTimeout(resolve, waitMs));
          waitMs = Math.min(waitMs * 2, 50);
        }
      }
    },
    async close() {
      // The descriptor belongs to the caller (stdout) or to the OffsetWriter's handle.
    },
  };
}

/** Writes to a Node Writable with backpressure; an error on the stream fails the next write (a StreamError). */
function writableSink(stream: Writable, label: string): SequentialSink {
  // The stream's own error (a socket reset under an upload) becomes a StreamError naming the output.
  const failed = (err: unknown) => streamError(err, label, 'write to');
  let failure: unknown;
  stream.on('error', (err) => {
    failure ??= err;
  });
  return {
    async write(chunk) {
      if (failure) throw failed(failure);
      if (!stream.write(chunk)) {
        // The listener that loses the race is removed, or every wait would leave one behind.
        const settled = new AbortController();
        try {
          await Promise.race([once(stream, 'drain', { signal: settled.signal }), once(stream, 'close', { signal: settled.signal })]);
        } catch (err) {
          // once() rejects with the stream's 'error' event: name it like every other failure.
          throw failed(failure ?? err);
        } finally {
          settled.abort();
        }
        if (failure) throw failed(failure);
      }
    },
    async close() {
      if (failure) throw failed(failure);
      await new Promise<void>((resolve, reject) => {
        stream.end((err?: Error | null) => (err ? reject(failed(err)) : resolve()));
      });
    },
  };
}

/**
 * The temporary name of an output: `.NAME.qs<PID>-<8 hex>.partial` beside it. The writer's
 * process id is the ownership marker that lets a later run remove what a killed one left.
 */
function partialPath(target: string): string {
  return join(dirname(target), `.${basename(target)}.qs${process.pid}-${randomBytes(4).toString('hex')}.partial`);
}

/**
 * Removes the temporary files a run killed while writing `target` left behind (SIGKILL, a
 * power cut: nothing of ours ran to remove them). Only ours: the exact name pattern of
 * {@link partialPath} for this output name, a regular file owned by this user, and a writer
 * process that no longer exists. Failures are ignored: this is tidying, not the run's work.
 */
async function removeStalePartials(target: string): Promise<void> {
  const dir = dirname(target);
  const prefix = `.${basename(target)}.qs`;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return;
  }
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    const match = /^(\d+)-[0-9a-f]{8}\.partial$/.exec(name.slice(prefix.length));
    if (!match) continue;
    const pid = Number(match[1]);
    if (pid === process.pid || processExists(pid)) continue;
    const path = join(dir, name);
    const stats = await lstat(path).catch(() => undefined);
    if (!stats?.isFile() || (process.getuid && stats.uid !== process.getuid())) continue;
    await unlink(path).catch(() => {});
  }
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it exists, owned by someone else.
    return (err as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

async function syncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** The facts of an OS error this module reports itself (the same as Node's for that error). */
function systemError(code: 'EISDIR' | 'EEXIST'): SystemErrorFacts {
  return { systemCode: code, errno: -osConstants.errno[code] };
}
