// Fault injection inside a CLI child process, loaded with NODE_OPTIONS=--import=<this file>
// (plain JavaScript: NODE_OPTIONS imports run before tsx is registered). Like faults.ts, it
// patches FileHandle.prototype and fails only calls on the targeted file. The fault comes from
// QCOW2_STREAM_TEST_FAULT, JSON:
//   { "method": "writev" | "truncate" | "sync", "path": regex source matched against the
//     descriptor's /proc/self/fd link, "okCalls": calls that succeed first, "code": "EIO" | "ENOSPC",
//     "position": optional, count only writev calls at this file position }
import { open } from 'node:fs/promises';
import { readlinkSync } from 'node:fs';

const spec = process.env.QCOW2_STREAM_TEST_FAULT;
if (spec) {
  const fault = JSON.parse(spec);
  const pattern = new RegExp(fault.path);
  const probe = await open(process.execPath, 'r');
  const prototype = Object.getPrototypeOf(probe);
  await probe.close();
  const original = prototype[fault.method];
  let calls = 0;
  prototype[fault.method] = function (...args) {
    let path = '';
    try {
      path = readlinkSync(`/proc/self/fd/${this.fd}`);
    } catch {
      // a closed handle: not ours to fail
    }
    const atPosition = fault.position === undefined || args[1] === fault.position;
    if (pattern.test(path) && atPosition && ++calls > fault.okCalls) {
      const message = fault.code === 'EIO' ? 'i/o error' : 'no space left on device';
      const error = Object.assign(new Error(`${fault.code}: ${message}, ${fault.method}`), {
        code: fault.code,
        errno: fault.code === 'EIO' ? -5 : -28,
        syscall: fault.method,
      });
      return Promise.reject(error);
    }
    return original.apply(this, args);
  };
}
