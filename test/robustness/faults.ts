/**
 * Fault injection through the file layer, without hooks in the library: every positional read
 * and write of the reader and of OffsetWriter goes through a `FileHandle`, so the tests patch
 * `FileHandle.prototype` and fail only the calls on the file they target (found by the
 * descriptor's /proc/self/fd link), leaving every other file of the process alone.
 */

import { readlinkSync, writeFileSync, rmSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { mock, type TestContext } from 'node:test';

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
  try {
    return readlinkSync(`/proc/self/fd/${handle.fd}`);
  } catch {
    return '';
  }
}

/** An errno-style error like the ones node:fs raises. */
export function errnoError(code: 'EIO' | 'ENOSPC', syscall: string): NodeJS.ErrnoException {
  const message = code === 'EIO' ? 'i/o error' : 'no space left on device';
  return Object.assign(new Error(`${code}: ${message}, ${syscall}`), { code, errno: code === 'EIO' ? -5 : -28, syscall });
}

/**
 * Makes `method` ('read' or 'writev') fail with `error` on handles whose path matches `target`,
 * after `okCalls` successful calls on them. Returns a counter of the calls seen on the target.
 */
export async function failOn(
  t: TestContext,
  method: 'read' | 'writev',
  target: (path: string) => boolean,
  okCalls: number,
  error: NodeJS.ErrnoException,
): Promise<{ calls: number }> {
  type Method = (this: FileHandle, ...args: unknown[]) => Promise<unknown>;
  const proto = (await fileHandlePrototype()) as Record<'read' | 'writev', Method>;
  const original = proto[method];
  const seen = { calls: 0 };
  const patched = mock.method(proto, method, function (this: FileHandle, ...args: unknown[]): Promise<unknown> {
    if (target(pathOfHandle(this))) {
      seen.calls++;
      if (seen.calls > okCalls) return Promise.reject(error);
    }
    return original.apply(this, args);
  });
  t.after(() => patched.mock.restore());
  return seen;
}

/** Counts the reads made on handles of `target` without changing them. */
export async function countReads(t: TestContext, target: (path: string) => boolean): Promise<{ calls: number }> {
  return failOn(t, 'read', target, Number.POSITIVE_INFINITY, errnoError('EIO', 'read'));
}


