/**
 * Numbers of the qcow2 format (docs/interop/qcow2.txt in the qemu tree), named once.
 * Bit masks of 64-bit entries are split in a high and a low 32-bit word, because tables are
 * decoded with two `getUint32` calls per entry (no bigint on the hot path).
 */

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

export const MIN_CLUSTER_BITS = 9; // 512 B
export const MAX_CLUSTER_BITS = 21; // 2 MiB: qemu's limit (the spec allows more; qemu refuses)
export const DEFAULT_CLUSTER_BITS = 16; // 64 KiB
export const DEFAULT_REFCOUNT_ORDER = 4; // 16-bit refcounts
export const MAX_REFCOUNT_ORDER = 6; // 64-bit refcounts

/** The v3 header as qemu writes it: 104 bytes of fields, compression_type, 7 bytes of padding. */
export const V3_HEADER_LENGTH = 112;
export const V3_MIN_HEADER_LENGTH = 104;
export const V2_HEADER_LENGTH = 72;

/** Incompatible feature bits (header offset 72). */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = 0x1fn;

/** Compatible feature bits (offset 80). */
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;

/** Autoclear feature bits (offset 88). Raw external data needs INCOMPAT_DATA_FILE (bit 2). */
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_KNOWN = 0x3n;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

export const CRYPT_NONE = 0;

/** Header extension types. */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441; // "DATA"

export const FEATURE_TABLE_ENTRY_SIZE = 48;
export const FEATURE_NAME_LENGTH = 46;

/** Feature kinds in the feature-name table. */
export const FEATURE_KIND_INCOMPATIBLE = 0;
export const FEATURE_KIND_COMPATIBLE = 1;
export const FEATURE_KIND_AUTOCLEAR = 2;

/**
 * Entries as (high word, low word) masks.
 * L1 entry: bits 9–55 L2 offset, bit 63 COPIED, bits 0–8 and 56–62 reserved.
 * L2 entry (standard): bit 0 zero, bits 1–8 reserved, 9–55 host offset, 56–61 reserved,
 * bit 62 compressed, bit 63 COPIED.
 */
export const ENTRY_COPIED_HI = 0x80000000;
export const ENTRY_COMPRESSED_HI = 0x40000000;
export const OFFSET_MASK_HI = 0x00ffffff; // bits 32–55
export const OFFSET_MASK_LO = 0xfffffe00; // bits 9–31
export const L1_RESERVED_MASK_HI = 0x7f000000; // bits 56–62
export const L1_RESERVED_MASK_LO = 0x000001ff; // bits 0–8
export const L2_ZERO_FLAG_LO = 0x00000001;
export const L2_RESERVED_MASK_HI = 0x3f000000; // bits 56–61
export const L2_RESERVED_MASK_LO = 0x000001fe; // bits 1–8
export const REFTABLE_RESERVED_MASK_LO = 0x000001ff;

/** The same masks as bigints, for code that already holds a 64-bit entry. */
export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
export const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
export const L2E_COPIED = 1n << 63n;
export const L2E_COMPRESSED = 1n << 62n;
export const L2E_ZERO = 1n;

/** Extended L2: 32 subclusters; bitmap low word = allocated bits, high word = reads-as-zero. */
export const SUBCLUSTERS_PER_CLUSTER = 32;
export const MIN_EXTL2_CLUSTER_BITS = 14;

/** qemu's limits at open, kept as ours (hostile-image bounds). */
export const MAX_L1_BYTES = 32 * 1024 * 1024; // 4,194,304 entries
export const MAX_L1_ENTRIES = MAX_L1_BYTES / 8;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_NAME = 1023;
export const MAX_BACKING_FORMAT_NAME = 15;
/** Offsets are 56-bit in the format, but we keep them as JS numbers: refuse anything ≥ 2^53. */
export const MAX_SAFE_OFFSET = Number.MAX_SAFE_INTEGER;
