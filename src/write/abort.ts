/** Cancellation through an AbortSignal: the error to throw, and a source that stops at once. */

import { AbortedError } from '../errors.js';

/** The AbortedError for an aborted signal (its reason when that already is one). */
export function abortError(signal: AbortSignal): AbortedError {
  const reason: unknown = signal.reason;
  return reason instanceof AbortedError ? reason : new AbortedError('The operation was aborted', { cause: reason });
}

/**
 * Yields from `source` until `signal` aborts, even while a read is pending (a quiet pipe).
 *
 * Not ix's `withAbort`: it only hands the signal to the source's own iterator, so a source
 * that ignores it (a pipe read, an NBD reply, any user's iterable) keeps the run waiting, and
 * its operators throw ix's AbortError rather than our AbortedError.
 *
 * One listener for the whole run, and each pending read's own reject: racing every read
 * against one never-settling abort promise would add a reaction to that promise per item, and
 * they are never freed (the heap grew by about 10 MB per GiB of input through a pipe).
 */
export async function* abortable<T>(source: AsyncIterable<T>, signal: AbortSignal): AsyncGenerator<T> {
  const iterator = source[Symbol.asyncIterator]();
  let rejectPending: ((reason: unknown) => void) | undefined;
  const onAbort = (): void => rejectPending?.(abortError(signal));
  signal.addEventListener('abort', onAbort, { once: true });
  let finished = false;
  try {
    for (;;) {
      if (signal.aborted) throw abortError(signal);
      const next = await new Promise<IteratorResult<T>>((resolve, reject) => {
        rejectPending = reject;
        iterator.next().then(resolve, reject);
      });
      rejectPending = undefined;
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

/** Settles with `promise`, or rejects with the AbortedError as soon as `signal` aborts (the promise is left to settle alone). */
export function raceAbort<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    promise.catch(() => {});
    return Promise.reject(abortError(signal));
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => {
      promise.catch(() => {});
      reject(abortError(signal));
    };
    signal.addEventListener('abort', onAbort, { once: true });
    promise.then(
      (value) => {
        signal.removeEventListener('abort', onAbort);
        resolve(value);
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(err);
      },
    );
  });
}
