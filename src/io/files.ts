/**
 * File handles with errors that name the file, and the one question every stage asks of a
 * path or descriptor: is it a regular file (seekable, may have holes) or a stream (pipe, tty)?
 */

import { open, type FileHandle } from 'node:fs/promises';
import { constants, type Stats } from 'node:fs';
import { fileError, UnexpectedEofError } from '../errors.js';

export type FileKind = 'file' | 'pipe' | 'socket' | 'char-device' | 'block-device' | 'directory' | 'other';

export function kindOf(stats: Stats): FileKind {
  if (stats.isFile()) return 'file';
  if (stats.isFIFO()) return 'pipe';
  if (stats.isSocket()) return 'socket';
  if (stats.isCharacterDevice()) return 'char-device';
  if (stats.isBlockDevice()) return 'block-device';
  if (stats.isDirectory()) return 'directory';
  return 'other';
}

/** Regular files and block devices take positional reads and writes; the rest are streams. */
export function isSeekableKind(kind: FileKind): boolean {
  return kind === 'file' || kind === 'block-device';
}

export interface OpenedFile {
  handle: FileHandle;
  path: string;
  kind: FileKind;
  /** Size in bytes for regular files; 0 for streams. */
  size: number;
}

export interface OpenForReadOptions {
  /**
   * Open with O_NONBLOCK, for callers that only accept regular files and block devices (where
   * the flag changes nothing): opening a FIFO for reading otherwise blocks until some writer
   * appears, so a FIFO put where an image or data file was expected (or swapped in after the
   * path policy looked) would hang the process instead of being refused.
   */
  nonBlocking?: boolean;
  /** Open with O_NOFOLLOW: a path whose last component is a symbolic link fails (ELOOP). */
  noFollow?: boolean;
}

/** Opens a file for reading; a directory or a failure becomes a FileError naming the path. */
export async function openForRead(path: string, options: OpenForReadOptions = {}): Promise<OpenedFile> {
  let handle: FileHandle;
  try {
    const flags = constants.O_RDONLY | (options.nonBlocking ? constants.O_NONBLOCK : 0) | (options.noFollow ? constants.O_NOFOLLOW : 0);
    handle = await open(path, flags);
  } catch (err) {
    throw fileError(err, 'open', path);
  }
  try {
    const stats = await handle.stat();
    const kind = kindOf(stats);
    if (kind === 'directory') throw Object.assign(new Error('is a directory'), { code: 'EISDIR' });
    return { handle, path, kind, size: kind === 'file' ? stats.size : 0 };
  } catch (err) {
    await handle.close().catch(() => {});
    throw fileError(err, 'open', path);
  }
}

/**
 * What positional reads go through: a FileHandle, or an object read with ranged GETs
 * (src/read/object-source.ts). Only local files have a descriptor.
 */
export interface ReadHandle {
  readonly fd?: number;
  read(buffer: Uint8Array, offset: number, length: number, position: number | null): Promise<{ bytesRead: number }>;
  close(): Promise<void>;
}

/**
 * Reads until `length` bytes are in `buffer` at `offset` or the file ends; returns the count.
 * `position` null reads from the current position (streams).
 */
export async function readFully(
  handle: ReadHandle,
  buffer: Uint8Array,
  offset: number,
  length: number,
  position: number | null,
  path: string,
): Promise<number> {
  let done = 0;
  while (done < length) {
    let bytesRead: number;
    try {
      ({ bytesRead } = await handle.read(buffer, offset + done, length - done, position === null ? null : position + done));
    } catch (err) {
      throw fileError(err, 'read', path);
    }
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}

/** Reads exactly `length` bytes at `position` or throws UnexpectedEofError naming the structure. */
export async function readExactly(
  handle: ReadHandle,
  length: number,
  position: number,
  path: string,
  structure: string,
): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  const got = await readFully(handle, out, 0, length, position, path);
  if (got < length) {
    throw new UnexpectedEofError(`'${path}' ends inside the ${structure} (needed ${length} bytes at offset ${position}, got ${got})`, {
      structure,
      offset: position,
    });
  }
  return out;
}
