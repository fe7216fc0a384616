/**
 * The public transforms: stages over Blocks, each as a generator (for composing in code) and
 * as a Node stream (for `pipeline(...)`).
 */
export { zeroDetect, createZeroDetectStream } from './zero-detect.js';
export { createHasher, fingerprintBlocks, createFingerprintStream, type Hasher } from './fingerprint.js';
export { FingerprintIndex, INDEX_BYTES_PER_ENTRY_AVERAGE, INDEX_BYTES_PER_ENTRY_MAX, type FingerprintIndexOptions } from './fingerprint-index.js';
export { Deduplicator, dedupBlocks, createDedupStream, type DedupStats, type DedupDecision, type DeduplicatorOptions, type DedupStageOptions } from './dedup.js';
export { compareWithBase, compareWithManifest, type BaseImage, type BaseCompareStats } from './base-compare.js';
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
} from './manifest.js';
