/**
 * The public transforms: stages over Blocks or batches of them, each of one shape,
 * `(items, options?) => AsyncIterable` (an ix AsyncIterableX, so `.pipe(filter(…), map(…))`
 * works on it), and as a Node stream (for `pipeline(...)`).
 */
export { zeroDetect, detectZeros, markZero, createZeroDetectStream } from './zero-detect.js';
export { createHasher, fingerprintBlocks, createFingerprintStream, type FingerprintOptions, type Hasher } from './fingerprint.js';
export { FingerprintIndex, INDEX_BYTES_PER_ENTRY_AVERAGE, INDEX_BYTES_PER_ENTRY_MAX, type FingerprintIndexOptions } from './fingerprint-index.js';
export { Deduplicator, dedupBlocks, createDedupStream, type DedupStage, type DedupStats, type DedupDecision, type DeduplicatorOptions, type DedupStageOptions } from './dedup.js';
export {
  compareWithBase,
  compareWithManifest,
  createBaseComparer,
  createManifestComparer,
  type BaseComparer,
  type BaseCompareStage,
  type BaseImage,
  type BaseCompareStats,
  type CompareWithBaseOptions,
  type CompareWithManifestOptions,
} from './base-compare.js';
export {
  ManifestWriter,
  ManifestReader,
  createManifestSink,
  encodeManifestHeader,
  decodeManifestHeader,
  guestFingerprint,
  MANIFEST_MAGIC,
  MANIFEST_VERSION,
  MANIFEST_HEADER_LENGTH,
  type ManifestHeader,
  type ManifestWriterOptions,
} from './manifest.js';
