/** What every long operation reports through its `onProgress` callback. */
export interface Progress {
  /** Guest bytes processed so far (skipped zeros count as done). */
  bytesDone: number;
  /** The total, when known (undefined for a pipe of unknown length). */
  bytesTotal?: number | undefined;
}
