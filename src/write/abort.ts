/** Cancellation through an AbortSignal: the error to throw, and a source that stops at once. */

import { AbortedError } from '../errors.js';

/** The AbortedError for an aborted signal (its reason when that already is one). */
export function abortError(signal: AbortSignal): AbortedError {
  const reason: unknown = signal.reason;
  return reason instanceof AbortedError ? reason : new AbortedError('The operation was aborted', { cause: reason });
}

/** Yields from `source` until `signal` aborts, even while a read is pending (a quiet pipe). */
export async function* abortable<T>(source: AsyncIterable<T>, signal: AbortSignal): AsyncGenerator<T> {
  const iterator = source[Symbol.asyncIterator]();
  let onAbort = (): void => {};
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => reject(abortError(signal));
  });
  aborted.catch(() => {});
  signal.addEventListener('abort', onAbort, { once: true });
  if (signal.aborted) onAbort();
  let finished = false;
  try {
    for (;;) {
      const next = await Promise.race([iterator.next(), aborted]);
      if (next.done) {
        finished = true;
        return;
      }
      yield next.value;
    }
  } finally {
    signal.removeEventListener('abort', onAbort);
    // Stop the source; after an abort its pending read may never settle, so do not wait for it.
    if (!finished) void iterator.return?.()?.catch?.(() => {});
  }
}
