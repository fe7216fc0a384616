/**
 * Fault injection through the file layer, without hooks in the library: every positional read
 * and write of the reader and of OffsetWriter goes through a `FileHandle`, so the tests patch
 * `FileHandle.prototype` and fail only the calls on the file they target (found by the
 * descriptor's /proc/self/fd link), leaving every other file of the process alone. The native
 * data mover (OffsetWriter.copyClustersFrom) writes from the thread pool instead: its calls are
 * patched on the addon and count as `writev` calls on their destination, at their offset.
 */

import { readlinkSync, writeFileSync, rmSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { mock, type TestContext } from 'node:test';
import { nativeAddon, type NativeAddon } from '../../src/io/native.js';

let prototype: object | undefined;

/** The shared prototype of every FileHandle in this process. */
export async function fileHandlePrototype(): Promise<Record<string, unknown>> {
  if (!prototype) {
    const probe = join(tmpdir(), `qcow2-stream-probe-${process.pid}`);
    writeFileSync(probe, '');
    const handle = await open(probe, 'r');
    prototype = Object.getPrototypeOf(handle) as object;
    await handle.close();
    rmSync(probe, { force: true });
  }
  return prototype as Record<string, unknown>;
}

export function pathOfHandle(handle: FileHandle): string {
  return pathOfFd(handle.fd);
}

export function pathOfFd(fd: number): string {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return '';
  }
}

/**
 * Routes every native copy (when the addon is loaded) through `intercept` twice, as the two
 * calls it stands for: a `read` of its source (`[, , , position]`, like FileHandle.read's
 * arguments) and a `writev` to its destination (`[, position]`), each with that file's path.
 * `intercept` returns a promise to answer the copy in its place, or undefined to let it go on.
 */
export function interceptNativeCopies(
  t: TestContext,
  intercept: (method: 'read' | 'writev', path: string, args: readonly unknown[]) => Promise<number> | undefined,
): void {
  const addon = nativeAddon();
  if (!addon) return;
  const original = addon.copyClusters;
  const patched = mock.method(addon, 'copyClusters', function (this: NativeAddon, ...args: Parameters<NativeAddon['copyClusters']>): Promise<number> {
    const [srcFd, srcOffset, dstFd, dstOffset] = args;
    return (
      intercept('read', pathOfFd(srcFd), [undefined, undefined, undefined, srcOffset]) ??
      intercept('writev', pathOfFd(dstFd), [undefined, dstOffset]) ??
      original.apply(addon, args)
    );
  });
  t.after(() => patched.mock.restore());
}

/** An errno-style error like the ones node:fs raises. */
export function errnoError(code: 'EIO' | 'ENOSPC', syscall: string): NodeJS.ErrnoException {
  const message = code === 'EIO' ? 'i/o error' : 'no space left on device';
  return Object.assign(new Error(`${code}: ${message}, ${syscall}`), { code, errno: code === 'EIO' ? -5 : -28, syscall });
}

/** The FileHandle methods the library's reads, writes, length changes and fsyncs go through. */
export type FaultableMethod = 'read' | 'writev' | 'truncate' | 'sync' | 'datasync';

/**
 * Makes `method` fail with `error` on handles whose path matches `target`, after `okCalls`
 * successful calls on them. With `when`, only calls whose arguments it accepts are counted
 * (and failed): say the write at position 0. Returns a counter of the calls seen.
 */
export async function failOn(
  t: TestContext,
  method: FaultableMethod,
  target: (path: string) => boolean,
  okCalls: number,
  error: NodeJS.ErrnoException,
  when: (args: readonly unknown[]) => boolean = () => true,
): Promise<{ calls: number }> {
  type Method = (this: FileHandle, ...args: unknown[]) => Promise<unknown>;
  const proto = (await fileHandlePrototype()) as Record<FaultableMethod, Method>;
  const original = proto[method];
  const seen = { calls: 0 };
  const fails = (path: string, args: readonly unknown[]) => {
    if (!target(path) || !when(args)) return false;
    seen.calls++;
    return seen.calls > okCalls;
  };
  const patched = mock.method(proto, method, function (this: FileHandle, ...args: unknown[]): Promise<unknown> {
    return fails(pathOfHandle(this), args) ? Promise.reject(error) : original.apply(this, args);
  });
  t.after(() => patched.mock.restore());
  if (method === 'writev' || method === 'read') {
    interceptNativeCopies(t, (as, path, args) => (as === method && fails(path, args) ? Promise.reject(error) : undefined));
  }
  return seen;
}

/** Counts the reads made on handles of `target` without changing them. */
export async function countReads(t: TestContext, target: (path: string) => boolean): Promise<{ calls: number }> {
  return failOn(t, 'read', target, Number.POSITIVE_INFINITY, errnoError('EIO', 'read'));
}

/**
 * Records the arguments of every `method` call on handles of `target`, changing nothing, until
 * `stop()` (or the end of the test).
 */
export async function traceCalls(
  t: TestContext,
  method: FaultableMethod,
  target: (path: string) => boolean,
): Promise<{ calls: unknown[][]; stop(): void }> {
  type Method = (this: FileHandle, ...args: unknown[]) => Promise<unknown>;
  const proto = (await fileHandlePrototype()) as Record<FaultableMethod, Method>;
  const original = proto[method];
  const calls: unknown[][] = [];
  let stopped = false;
  const patched = mock.method(proto, method, function (this: FileHandle, ...args: unknown[]): Promise<unknown> {
    if (target(pathOfHandle(this))) calls.push(args);
    return original.apply(this, args);
  });
  if (method === 'writev' || method === 'read') {
    interceptNativeCopies(t, (as, path, args) => {
      if (as === method && !stopped && target(path)) calls.push([...args]);
      return undefined;
    });
  }
  const stop = () => {
    if (!stopped) patched.mock.restore();
    stopped = true;
  };
  t.after(stop);
  return { calls, stop };
}
