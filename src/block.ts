/**
 * The one record that flows between pipeline stages: a guest cluster and what the transforms
 * learned about it. Transforms annotate blocks; they never re-slice them.
 */
export interface Block {
  /** Guest cluster index: the block covers guest bytes [index·clusterSize, +data.length). */
  readonly index: number;
  /**
   * The cluster's bytes. Exactly clusterSize long, except the last cluster of an image, which
   * may be shorter. Often a view into a larger read buffer: do not keep it past the sink.
   */
  readonly data: Uint8Array;
  /** Set by zero-detect: every byte is zero. */
  zero?: boolean;
  /** Set by dedup: a fingerprint of `data` (xxhash64). */
  fingerprint?: bigint;
  /** Set by dedup: an earlier guest cluster of this image holds the same bytes. */
  duplicateOf?: number;
  /** Set by dedup against a base image: the base holds the same bytes at the same offset. */
  sameAsBase?: boolean;
}

/** Stream options shared by every Block stage (object mode; a bounded queue of blocks). */
export const BLOCK_STREAM_HIGH_WATER_MARK = 32;
