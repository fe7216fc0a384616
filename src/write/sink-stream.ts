/**
 * The Writable face of a sink, shared by createExternalSink and createInternalSink: the writer
 * opens in `_construct`, takes each Block or batch, finishes in `_final`, and is aborted (its
 * outputs removed) when the stream is destroyed first.
 */

import { Writable } from 'node:stream';
import type { BlockItem } from '../block.js';
import { AbortedError, streamError } from '../errors.js';

/** What a sink stream drives: a writer fed items, then finished or aborted. */
export interface ItemWriter<R> {
  /** Takes the next Block or batch. */
  writeItem(item: BlockItem): Promise<void>;
  /** Completes the image and puts it in place; resolves with the summary. */
  finish(): Promise<R>;
  /** Removes what was written. */
  abort(): Promise<void>;
}

/** A Writable (object mode) over a writer; `finished` resolves with the writer's summary. */
export class WriterSinkStream<R> extends Writable {
  /**
   * What was written, once the image is complete (committed):
   * `await pipeline(source, …, sink); const summary = await sink.finished;`. Rejects with the
   * error that stopped the sink (an upstream failure as a StreamError), or an AbortedError when
   * it was destroyed before finishing.
   */
  readonly finished: Promise<R>;
  /** What was written; undefined until the stream has finished. {@link finished} is the typed way to wait for it. */
  result: R | undefined;
  private writer: ItemWriter<R> | undefined;
  private readonly resolveFinished: (result: R) => void;
  private readonly rejectFinished: (reason: unknown) => void;

  /** `open` creates the writer (and its outputs) when the stream is constructed. */
  constructor(
    private readonly open: () => Promise<ItemWriter<R>>,
    highWaterMark: number,
  ) {
    super({ objectMode: true, highWaterMark });
    let resolve!: (result: R) => void;
    let reject!: (reason: unknown) => void;
    this.finished = new Promise<R>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    // Callers who only await pipeline() get the error there; an unobserved rejection here must not crash the process.
    this.finished.catch(() => {});
    this.resolveFinished = resolve;
    this.rejectFinished = reject;
  }

  /** Opens the outputs (Node's stream hook). @internal */
  override _construct(callback: (error?: Error | null) => void): void {
    this.open().then(
      (writer) => {
        this.writer = writer;
        callback();
      },
      (err: Error) => callback(err),
    );
  }

  /** Writes one Block or batch (Node's stream hook). @internal */
  override _write(item: BlockItem, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    const writer = this.writer;
    if (!writer) {
      callback(new Error('unreachable: write before the sink opened'));
      return;
    }
    writer.writeItem(item).then(() => callback(), (err: Error) => callback(err));
  }

  /** Finishes the image (Node's stream hook). @internal */
  override _final(callback: (error?: Error | null) => void): void {
    const writer = this.writer;
    if (!writer) {
      callback(new Error('unreachable: final before the sink opened'));
      return;
    }
    writer.finish().then(
      (result) => {
        this.result = result;
        this.resolveFinished(result);
        callback();
      },
      (err: Error) => callback(err),
    );
  }

  /** Removes the outputs after a failure (Node's stream hook). @internal */
  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    // Destroyed before finishing (an upstream failure, or destroy() by the caller): clean up.
    if (this.result === undefined) {
      const aborted = () => {
        // An upstream failure or a pipeline's abort (Node's AbortError) comes out as ours.
        this.rejectFinished(error ? streamError(error, 'input') : new AbortedError('The sink was destroyed before the image was complete'));
        callback(error);
      };
      if (this.writer) this.writer.abort().then(aborted, aborted);
      else aborted();
      return;
    }
    callback(error);
  }
}
