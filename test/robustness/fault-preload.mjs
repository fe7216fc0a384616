// Fault injection inside a CLI child process, loaded with NODE_OPTIONS=--import=<this file>
// (plain JavaScript: NODE_OPTIONS imports run before tsx is registered). Like faults.ts, it
// patches FileHandle.prototype and fails only calls on the targeted file. The fault comes from
// QCOW2_STREAM_TEST_FAULT, JSON:
//   { "method": "writev" | "truncate" | "sync", "path": regex source matched against the
//     descriptor's /proc/self/fd link, "okCalls": calls that succeed first, "code": "EIO" | "ENOSPC",
//     "position": optional, count only writev calls at this file position }
// The native data mover's copies (src/io/native.ts) count as writev calls on their destination.
import { open } from 'node:fs/promises';
import { existsSync, readlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const spec = process.env.QCOW2_STREAM_TEST_FAULT;
if (spec) {
  const fault = JSON.parse(spec);
  const pattern = new RegExp(fault.path);
  const probe = await open(process.execPath, 'r');
  const prototype = Object.getPrototypeOf(probe);
  await probe.close();
  const original = prototype[fault.method];
  let calls = 0;
  const pathOf = (fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      return ''; // a closed descriptor: not ours to fail
    }
  };
  const fails = (path, position) => pattern.test(path) && (fault.position === undefined || position === fault.position) && ++calls > fault.okCalls;
  const failure = () => {
    const message = fault.code === 'EIO' ? 'i/o error' : 'no space left on device';
    return Object.assign(new Error(`${fault.code}: ${message}, ${fault.method}`), {
      code: fault.code,
      errno: fault.code === 'EIO' ? -5 : -28,
      syscall: fault.method === 'writev' ? 'write' : fault.method,
    });
  };
  prototype[fault.method] = function (...args) {
    return fails(pathOf(this.fd), args[1]) ? Promise.reject(failure()) : original.apply(this, args);
  };
  // The same module object the library loads (require caches it by path).
  const addonPath = fileURLToPath(new URL('../../src/native/build/Release/qcow2_native.node', import.meta.url));
  if (fault.method === 'writev' && existsSync(addonPath)) {
    const addon = createRequire(import.meta.url)(addonPath);
    const copy = addon.copyClusters;
    addon.copyClusters = (srcFd, srcOffset, dstFd, dstOffset, ...rest) =>
      fails(pathOf(dstFd), dstOffset) ? Promise.reject(failure()) : copy.call(addon, srcFd, srcOffset, dstFd, dstOffset, ...rest);
  }
}
