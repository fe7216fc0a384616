/**
 * qcow2-stream: convert disk images between raw and qcow2 with an external data file, as
 * streams, in both directions.
 *
 * ```ts
 * import { convert, openImage, exportToFile } from 'qcow2-stream';
 *
 * await convert({ input: 'disk.raw', output: 'disk.qcow2' });        // + disk.data
 * const image = await openImage('disk.qcow2');
 * await exportToFile(image, 'roundtrip.raw');
 * await image.close();
 * ```
 *
 * Transforms over Blocks (zero-detect, dedup, fingerprints, manifests, base comparison) are in
 * `qcow2-stream/transforms`.
 *
 * @packageDocumentation
 */

export * from './errors.js';
export {
  blockEnd,
  expandZeroRuns,
  flattenBatches,
  isBatch,
  perBlock,
  toBatches,
  zeroRun,
  MAX_BATCH_BLOCKS,
  type Block,
  type BlockBatch,
  type BlockItem,
  type ToBatchesOptions,
} from './block.js';
export type { Progress } from './progress.js';
export * from './write/index.js';
export * from './read/index.js';
export { OffsetWriter, type CopySource, type OutputTarget, type OutputOptions } from './io/output.js';
export { resolveStoredName, type PathPolicyOptions, type StoredNameKind } from './io/path-policy.js';
/** Whether the optional native addon is in use, and why not. */
export { nativeAddonStatus, type NativeAddonStatus } from './io/native.js';
/** The pure codec (header, tables, refcounts, layout), for tools that build or inspect images. */
export * as format from './format/index.js';
/** The NBD client (reads, block status, dirty bitmaps) that convert() uses for nbd:// inputs. */
export {
  NbdClient,
  parseNbdUri,
  isNbdUri,
  dirtyBitmapContext,
  BASE_ALLOCATION,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  NBD_STATE_DIRTY,
  type NbdAddress,
  type NbdBlockSize,
  type NbdConnectOptions,
  type NbdExtent,
  type NbdReadResult,
  type NbdStats,
  type NbdTlsOptions,
} from './io/nbd.js';
