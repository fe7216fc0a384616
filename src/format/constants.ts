/**
 * Numbers of the qcow2 format (docs/interop/qcow2.txt in the qemu tree), named once.
 * Bit masks of 64-bit entries are split in a high and a low 32-bit word, because tables are
 * decoded with two `getUint32` calls per entry (no bigint on the hot path).
 */

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

/** Smallest `cluster_bits`: 512-byte clusters. */
export const MIN_CLUSTER_BITS = 9; // 512 B
/** Largest `cluster_bits` qemu opens: 2 MiB clusters. */
export const MAX_CLUSTER_BITS = 21; // 2 MiB: qemu's limit (the spec allows more; qemu refuses)
/** `cluster_bits` when none is given: 64 KiB clusters, as qemu-img. */
export const DEFAULT_CLUSTER_BITS = 16; // 64 KiB
/** `refcount_order` when none is given: 16-bit refcounts, as qemu-img. */
export const DEFAULT_REFCOUNT_ORDER = 4; // 16-bit refcounts
/** Largest `refcount_order`: 64-bit refcounts. */
export const MAX_REFCOUNT_ORDER = 6; // 64-bit refcounts

/** The v3 header as qemu writes it: 104 bytes of fields, compression_type, 7 bytes of padding. */
export const V3_HEADER_LENGTH = 112;
/** The shortest valid v3 header: the fields up to and including `header_length`. */
export const V3_MIN_HEADER_LENGTH = 104;
/** The fixed length of a version 2 header. */
export const V2_HEADER_LENGTH = 72;

/** Incompatible feature bits (header offset 72). */
export const INCOMPAT_DIRTY = 1n << 0n;
/** Incompatible bit 1: the image is marked corrupt. */
export const INCOMPAT_CORRUPT = 1n << 1n;
/** Incompatible bit 2: guest data lives in an external data file. */
export const INCOMPAT_DATA_FILE = 1n << 2n;
/** Incompatible bit 3: the `compression_type` field is valid (and may be zstd). */
export const INCOMPAT_COMPRESSION = 1n << 3n;
/** Incompatible bit 4: extended L2 entries (32 subclusters per cluster). */
export const INCOMPAT_EXTL2 = 1n << 4n;
/** Every incompatible bit this library understands; any other bit makes an image unreadable. */
export const INCOMPAT_KNOWN = 0x1fn;

/** Compatible feature bits (offset 80). */
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;

/** Autoclear feature bits (offset 88). Raw external data needs INCOMPAT_DATA_FILE (bit 2). */
export const AUTOCLEAR_BITMAPS = 1n << 0n;
/** Autoclear bit 1: the data file alone is a valid raw image of the guest (`data_file_raw`). */
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
/** Every autoclear bit this library understands. */
export const AUTOCLEAR_KNOWN = 0x3n;

/** `compression_type` 0: deflate (raw, window bits 12). */
export const COMPRESSION_ZLIB = 0;
/** `compression_type` 1: zstd. */
export const COMPRESSION_ZSTD = 1;

/** `crypt_method` 0: not encrypted (the only method this library reads). */
export const CRYPT_NONE = 0;

/** Header extension types. */
export const EXT_END = 0x00000000;
/** Header extension: the backing file's format name. */
export const EXT_BACKING_FORMAT = 0xe2792aca;
/** Header extension: the feature-name table. */
export const EXT_FEATURE_TABLE = 0x6803f857;
/** Header extension: persistent dirty bitmaps. */
export const EXT_BITMAPS = 0x23852875;
/** Header extension: the encryption header (LUKS). */
export const EXT_CRYPTO_HEADER = 0x0537be77;
/** Header extension: the external data file's name. */
export const EXT_DATA_FILE = 0x44415441; // "DATA"

/** Bytes per feature-name table entry: kind, bit, 46-byte name. */
export const FEATURE_TABLE_ENTRY_SIZE = 48;
/** Bytes of the name in a feature-name table entry (NUL-padded). */
export const FEATURE_NAME_LENGTH = 46;

/** Feature kinds in the feature-name table. */
export const FEATURE_KIND_INCOMPATIBLE = 0;
/** Feature-name table kind 1: a compatible feature bit. */
export const FEATURE_KIND_COMPATIBLE = 1;
/** Feature-name table kind 2: an autoclear feature bit. */
export const FEATURE_KIND_AUTOCLEAR = 2;

/**
 * Entries as (high word, low word) masks.
 * L1 entry: bits 9–55 L2 offset, bit 63 COPIED, bits 0–8 and 56–62 reserved.
 * L2 entry (standard): bit 0 zero, bits 1–8 reserved, 9–55 host offset, 56–61 reserved,
 * bit 62 compressed, bit 63 COPIED.
 */
export const ENTRY_COPIED_HI = 0x80000000;
/** High word of an L2 entry: bit 62, compressed cluster. */
export const ENTRY_COMPRESSED_HI = 0x40000000;
/** High word of the offset field of L1 and L2 entries (bits 32–55). */
export const OFFSET_MASK_HI = 0x00ffffff; // bits 32–55
/** Low word of the offset field of L1 and L2 entries (bits 9–31). */
export const OFFSET_MASK_LO = 0xfffffe00; // bits 9–31
/** High word of the reserved bits of an L1 entry (bits 56–62). */
export const L1_RESERVED_MASK_HI = 0x7f000000; // bits 56–62
/** Low word of the reserved bits of an L1 entry (bits 0–8). */
export const L1_RESERVED_MASK_LO = 0x000001ff; // bits 0–8
/** Low word of a standard L2 entry: bit 0, the cluster reads as zeros. */
export const L2_ZERO_FLAG_LO = 0x00000001;
/** High word of the reserved bits of a standard L2 entry (bits 56–61). */
export const L2_RESERVED_MASK_HI = 0x3f000000; // bits 56–61
/** Low word of the reserved bits of a standard L2 entry (bits 1–8). */
export const L2_RESERVED_MASK_LO = 0x000001fe; // bits 1–8
/** Low word of the reserved bits of a refcount-table entry (bits 0–8). */
export const REFTABLE_RESERVED_MASK_LO = 0x000001ff;

/** The same masks as bigints, for code that already holds a 64-bit entry. */
export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
/** The host-offset field of an L2 entry, as a bigint mask. */
export const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
/** Bit 63 of an L1 or L2 entry: COPIED (refcount exactly 1). */
export const L2E_COPIED = 1n << 63n;
/** Bit 62 of an L2 entry: compressed cluster. */
export const L2E_COMPRESSED = 1n << 62n;
/** Bit 0 of a standard L2 entry: the cluster reads as zeros. */
export const L2E_ZERO = 1n;

/** Extended L2: 32 subclusters; bitmap low word = allocated bits, high word = reads-as-zero. */
export const SUBCLUSTERS_PER_CLUSTER = 32;
/** The smallest `cluster_bits` qemu allows with extended L2 entries (16 KiB clusters). */
export const MIN_EXTL2_CLUSTER_BITS = 14;

/** qemu's limits at open, kept as ours (hostile-image bounds). */
export const MAX_L1_BYTES = 32 * 1024 * 1024; // 4,194,304 entries
/** The default maxChainDepth of the readers: images in a chain, the top and a raw bottom counted. */
export const DEFAULT_MAX_CHAIN_DEPTH = 128;
/** Bytes of L1 tables all the images of one chain may hold in memory together. */
export const MAX_CHAIN_L1_BYTES = 64 * 1024 * 1024;
/** The most L1 entries accepted ({@link MAX_L1_BYTES} / 8). */
export const MAX_L1_ENTRIES = MAX_L1_BYTES / 8;
/** The largest refcount table accepted, in bytes (qemu's limit). */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
/** The most internal snapshots accepted (qemu's limit). */
export const MAX_SNAPSHOTS = 65536;
/** The longest backing-file name accepted, in bytes (qemu's limit). */
export const MAX_BACKING_NAME = 1023;
/** The longest backing-format name accepted, in bytes. */
export const MAX_BACKING_FORMAT_NAME = 15;
/** Offsets are 56-bit in the format, but we keep them as JS numbers: refuse anything ≥ 2^53. */
export const MAX_SAFE_OFFSET = Number.MAX_SAFE_INTEGER;
