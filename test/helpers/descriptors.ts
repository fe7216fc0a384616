/** Open file descriptors of this process, for tests that prove nothing is left open. */

import { readdirSync, readlinkSync } from 'node:fs';

/** The descriptors open in this process, as `fd -> path`. */
export function openDescriptors(): string[] {
  const out: string[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      out.push(`${fd} -> ${readlinkSync(`/proc/self/fd/${fd}`)}`);
    } catch {
      // readdir's own descriptor, gone by now
    }
  }
  return out;
}

/** The descriptors opened since `before` that are still open. */
export function leakedSince(before: readonly string[]): string[] {
  return openDescriptors().filter((d) => !before.includes(d));
}
