/**
 * The optional N-API addon (src/native/qcow2_native.c, built at install): the few system calls
 * Node's fs lacks. The library works without it, only more slowly; set QCOW2_STREAM_NO_NATIVE=1
 * to ignore it (the tests run both ways).
 */

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { getSystemErrorName } from 'node:util';

/** The addon's interface. */
export interface NativeAddon {
  /** lseek(SEEK_DATA): the first data byte at or after `offset`, or the file size when there is none. */
  nextData(fd: number, offset: number): number;
  /** lseek(SEEK_HOLE): the first hole byte at or after `offset` (the end of the file counts as a hole). */
  nextHole(fd: number, offset: number): number;
  /**
   * On the thread pool: reads `length` bytes (at most 16 MiB) of `srcFd` at `srcOffset`, sets
   * `flags[i]` to 1 for each all-zero cluster and 0 for the others, and writes the runs of
   * non-zero clusters to `dstFd` at `dstOffset` plus their position in the chunk. Resolves with
   * the bytes read (fewer than `length`: the source ended); rejects with an Error carrying a
   * negative `errno` and `syscall` (`read` or `write`).
   */
  copyClusters(srcFd: number, srcOffset: number, dstFd: number, dstOffset: number, length: number, clusterSize: number, flags: Uint8Array): Promise<number>;
  /** XXH64 (seed 0) of the bytes, as xxhash-wasm's h64Raw gives it, without the copy into wasm memory. */
  xxh64?(bytes: Uint8Array): bigint;
  /**
   * Linux: on the thread pool, fills `buffer[offset, offset + length)` from a pipe, FIFO or
   * socket, waiting in poll() on `fd` and on the canceller `efd` (never blocked in read()).
   * Resolves with the bytes read (fewer than `length` only at the end of the input); rejects
   * with `errno` −ECANCELED once the canceller is signalled, or another negative errno.
   */
  readFull?(fd: number, buffer: Uint8Array, offset: number, length: number, efd: number): Promise<number>;
  /** Linux: the same for writing all of `buffer[offset, offset + length)`; EPIPE once the reader is gone. */
  writeFull?(fd: number, buffer: Uint8Array, offset: number, length: number, efd: number): Promise<number>;
  /** Linux: a new eventfd to cancel readFull/writeFull with; close it with fs.closeSync. */
  createCanceller?(): number;
  /** Linux: wakes every readFull/writeFull waiting on this canceller, now and later, with ECANCELED. */
  signalCanceller?(efd: number): void;
  /** Linux: F_SETPIPE_SZ up to `bytes` (halved until allowed); the pipe's size after, 0 if `fd` is no pipe. */
  setPipeSize?(fd: number, bytes: number): number;
  /**
   * Linux: splice(2) `length` bytes of the file `srcFd` at `srcOffset` into the pipe `pipeFd`
   * on the thread pool (the page cache's pages are handed to the pipe, not copied), waiting in
   * poll() like writeFull. Resolves with the bytes moved: fewer than `length` only where the
   * file ends. EINVAL where the file system cannot splice.
   */
  spliceFile?(srcFd: number, srcOffset: number, pipeFd: number, length: number, efd: number): Promise<number>;
}

/**
 * An addon call's error with Node's system-error `code` (EIO, EPIPE…) set from its negative
 * `errno`, as fileError() reads it; anything else is returned as it is.
 */
export function withErrnoCode(err: unknown): unknown {
  const errno = (err as { errno?: unknown } | null)?.errno;
  return typeof errno === 'number' && err instanceof Error ? Object.assign(err, { code: getSystemErrorName(errno) }) : err;
}

/** Set to any value but '' or '0' to ignore the addon. */
export const NO_NATIVE_ENV = 'QCOW2_STREAM_NO_NATIVE';

/**
 * Where node-gyp leaves the addon, relative to this module: from src/io (tsx, tests) and from
 * dist/src/io (the built package).
 */
const ADDON_PATHS = ['../native/build/Release/qcow2_native.node', '../../../src/native/build/Release/qcow2_native.node'];

/**
 * Whether the addon is in use, and why not. Without it everything still works: holes are read
 * instead of skipped, pipes go through the event loop, hashing through xxhash-wasm, and a plain
 * file conversion goes through Blocks instead of the native data mover.
 */
export type NativeAddonStatus =
  | {
      /** The addon is loaded and used. */
      readonly active: true;
      /** The file it was loaded from. */
      readonly path: string;
    }
  | {
      /** The addon is not used. */
      readonly active: false;
      /**
       * `disabled`: QCOW2_STREAM_NO_NATIVE is set; `not-built`: the install did not build it
       * (no compiler, or `npm install --ignore-scripts`); `load-failed`: it is there but does not
       * load (built for another platform or Node.js ABI; `message` says what the loader said).
       */
      readonly reason: 'disabled' | 'not-built' | 'load-failed';
      /** What happened, for people. */
      readonly message: string;
      /** `load-failed`: the file that did not load. */
      readonly path?: string;
    };

/** undefined: not tried yet; null: not available (`failure` says why). */
let addon: NativeAddon | null | undefined;
let loadedFrom: string | undefined;
let failure: { path: string; message: string } | undefined;

function loadAddon(): NativeAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  const require = createRequire(import.meta.url);
  for (const relative of ADDON_PATHS) {
    const path = fileURLToPath(new URL(relative, import.meta.url));
    if (!existsSync(path)) continue;
    try {
      addon = require(path) as NativeAddon;
      loadedFrom = path;
      failure = undefined;
      break;
    } catch (err) {
      // Built for another platform or a broken build: the pure-JS path still works.
      failure ??= { path, message: err instanceof Error ? err.message : String(err) };
    }
  }
  return addon;
}

function nativeDisabled(): boolean {
  const value = process.env[NO_NATIVE_ENV];
  return value !== undefined && value !== '' && value !== '0';
}

/**
 * The addon, or null when it is not built or QCOW2_STREAM_NO_NATIVE is set (asked at each call,
 * so a test can switch it). Callers look functions up on the returned object when they call
 * them, which lets fault-injection tests wrap them.
 */
export function nativeAddon(): NativeAddon | null {
  return nativeDisabled() ? null : loadAddon();
}

/**
 * Whether the optional native addon is in use, and if not, why (the environment variable, not
 * built at install, or a build that does not load here). Asked at each call, like the library
 * itself does.
 *
 * ```ts
 * const status = nativeAddonStatus();
 * if (!status.active) console.warn(`qcow2-stream runs without its addon (${status.reason}): ${status.message}`);
 * ```
 */
export function nativeAddonStatus(): NativeAddonStatus {
  if (nativeDisabled()) return { active: false, reason: 'disabled', message: `${NO_NATIVE_ENV}=${process.env[NO_NATIVE_ENV]} is set: the addon is ignored` };
  if (loadAddon() && loadedFrom !== undefined) return { active: true, path: loadedFrom };
  if (failure) return { active: false, reason: 'load-failed', path: failure.path, message: failure.message };
  return { active: false, reason: 'not-built', message: 'The addon was not built at install (it needs a C compiler and node-gyp); the library works without it, more slowly' };
}
