/**
 * The qcow2 header (spec: "Header") and its extensions ("Header extensions").
 *
 * The header is declared once, as a field table; decode and encode both walk it.
 * Fields at or beyond `header_length` are absent and read as 0 (v2 images stop at 72 bytes).
 */

import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  CRYPT_NONE,
  DEFAULT_REFCOUNT_ORDER,
  EXT_BACKING_FORMAT,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_END,
  EXT_FEATURE_TABLE,
  FEATURE_KIND_AUTOCLEAR,
  FEATURE_KIND_COMPATIBLE,
  FEATURE_KIND_INCOMPATIBLE,
  FEATURE_NAME_LENGTH,
  FEATURE_TABLE_ENTRY_SIZE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  INCOMPAT_KNOWN,
  MAX_BACKING_FORMAT_NAME,
  MAX_BACKING_NAME,
  MAX_CLUSTER_BITS,
  MAX_REFCOUNT_ORDER,
  MIN_CLUSTER_BITS,
  MIN_EXTL2_CLUSTER_BITS,
  QCOW2_MAGIC,
  V2_HEADER_LENGTH,
  V3_HEADER_LENGTH,
  V3_MIN_HEADER_LENGTH,
} from './constants.js';
import { alignUp, decodeName, encodeName, getU64, getU64Big, setU64, setU64Big, viewOf } from './bytes.js';
import {
  BadMagicError,
  CorruptImageError,
  InvalidArgumentError,
  UnexpectedEofError,
  UnsupportedFeatureError,
  UnsupportedVersionError,
} from '../errors.js';

/** The fixed header fields, with JS names. 64-bit sizes and offsets are numbers (< 2^53). */
export interface HeaderFields {
  /** `magic` (offset 0): 0x514649fb, "QFI\xfb". */
  magic: number;
  /** `version` (offset 4): 2 or 3. */
  version: number;
  /** `backing_file_offset` (offset 8): where the backing file name is in cluster 0; 0 for none. */
  backingFileOffset: number;
  /** `backing_file_size` (offset 16): length of the backing file name in bytes. */
  backingFileSize: number;
  /** `cluster_bits` (offset 20): log2 of the cluster size. */
  clusterBits: number;
  /** `size` (offset 24): the virtual disk size in bytes. */
  size: number;
  /** `crypt_method` (offset 32): 0 none, 1 AES, 2 LUKS. */
  cryptMethod: number;
  /** `l1_size` (offset 36): entries in the active L1 table. */
  l1Size: number;
  /** `l1_table_offset` (offset 40): file offset of the active L1 table. */
  l1TableOffset: number;
  /** `refcount_table_offset` (offset 48): file offset of the refcount table. */
  refcountTableOffset: number;
  /** `refcount_table_clusters` (offset 56): clusters the refcount table occupies. */
  refcountTableClusters: number;
  /** `nb_snapshots` (offset 60): internal snapshots in the image. */
  nbSnapshots: number;
  /** `snapshots_offset` (offset 64): file offset of the snapshot table. */
  snapshotsOffset: number;
  /** `incompatible_features` (offset 72, v3): bits a reader must understand to open the image. */
  incompatibleFeatures: bigint;
  /** `compatible_features` (offset 80, v3): bits a reader may ignore. */
  compatibleFeatures: bigint;
  /** `autoclear_features` (offset 88, v3): bits a writer that does not know them must clear. */
  autoclearFeatures: bigint;
  /** `refcount_order` (offset 96, v3): log2 of the refcount width in bits (4 = 16 bits). */
  refcountOrder: number;
  /** `header_length` (offset 100, v3): bytes of the header; 72 for v2. */
  headerLength: number;
  /** `compression_type` (offset 104): 0 zlib, 1 zstd; valid with incompatible bit 3. */
  compressionType: number;
}

type FieldKind = 'u8' | 'u32' | 'u64' | 'bits64';
interface FieldSpec {
  readonly key: keyof HeaderFields;
  /** The spec's name, used in error messages. */
  readonly specName: string;
  readonly offset: number;
  readonly kind: FieldKind;
}

/** The on-disk header: offset and width of every field, in spec order. */
export const HEADER_FIELDS: readonly FieldSpec[] = [
  { key: 'magic', specName: 'magic', offset: 0, kind: 'u32' },
  { key: 'version', specName: 'version', offset: 4, kind: 'u32' },
  { key: 'backingFileOffset', specName: 'backing_file_offset', offset: 8, kind: 'u64' },
  { key: 'backingFileSize', specName: 'backing_file_size', offset: 16, kind: 'u32' },
  { key: 'clusterBits', specName: 'cluster_bits', offset: 20, kind: 'u32' },
  { key: 'size', specName: 'size', offset: 24, kind: 'u64' },
  { key: 'cryptMethod', specName: 'crypt_method', offset: 32, kind: 'u32' },
  { key: 'l1Size', specName: 'l1_size', offset: 36, kind: 'u32' },
  { key: 'l1TableOffset', specName: 'l1_table_offset', offset: 40, kind: 'u64' },
  { key: 'refcountTableOffset', specName: 'refcount_table_offset', offset: 48, kind: 'u64' },
  { key: 'refcountTableClusters', specName: 'refcount_table_clusters', offset: 56, kind: 'u32' },
  { key: 'nbSnapshots', specName: 'nb_snapshots', offset: 60, kind: 'u32' },
  { key: 'snapshotsOffset', specName: 'snapshots_offset', offset: 64, kind: 'u64' },
  { key: 'incompatibleFeatures', specName: 'incompatible_features', offset: 72, kind: 'bits64' },
  { key: 'compatibleFeatures', specName: 'compatible_features', offset: 80, kind: 'bits64' },
  { key: 'autoclearFeatures', specName: 'autoclear_features', offset: 88, kind: 'bits64' },
  { key: 'refcountOrder', specName: 'refcount_order', offset: 96, kind: 'u32' },
  { key: 'headerLength', specName: 'header_length', offset: 100, kind: 'u32' },
  { key: 'compressionType', specName: 'compression_type', offset: 104, kind: 'u8' },
];

const FIELD_WIDTH: Record<FieldKind, number> = { u8: 1, u32: 4, u64: 8, bits64: 8 };

/** Bytes needed to decode every fixed field of a v3 header. */
export const HEADER_PROBE_SIZE = V3_HEADER_LENGTH;

/** A header extension as stored after the header: its type and its data (padding excluded). */
export interface HeaderExtension {
  /** The extension type, e.g. {@link EXT_DATA_FILE}. */
  type: number;
  /** The extension's bytes, without the 8-byte type/length prefix and the padding. */
  data: Uint8Array;
}

/** An entry of the feature-name table: which bit of which feature field, and its name. */
export interface FeatureName {
  /** The feature field; an unknown kind code is kept as its number. */
  kind: 'incompatible' | 'compatible' | 'autoclear' | number;
  /** The bit number within that field (0–63). */
  bit: number;
  /** The human name, e.g. `external data file`. */
  name: string;
}

/** Everything cluster 0 says: fields, extensions, and the names they carry. */
export interface ParsedHeader extends HeaderFields {
  /** Bytes per cluster: 2 ** `clusterBits`. */
  clusterSize: number;
  /** Every extension in file order, END excluded; unknown ones kept as they were. */
  extensions: HeaderExtension[];
  /** The external data file's name from its extension, as stored (untrusted: see the path policy). */
  dataFileName: string | undefined;
  /** The backing file's name, as stored (untrusted: see the path policy). */
  backingFileName: string | undefined;
  /** The backing file's format from its extension (`qcow2`, `raw`…), as stored. */
  backingFormat: string | undefined;
  /** The image's feature-name table (empty when it has none). */
  featureNames: FeatureName[];
  /** Bytes of the header beyond the fields we know (header_length > 112), kept verbatim. */
  unknownHeaderBytes: Uint8Array;
}

function readField(view: DataView, spec: FieldSpec, headerLength: number): number | bigint {
  if (spec.offset + FIELD_WIDTH[spec.kind] > headerLength) return spec.kind === 'bits64' ? 0n : 0;
  const context = { structure: 'header', field: spec.specName, offset: spec.offset };
  switch (spec.kind) {
    case 'u8': return view.getUint8(spec.offset);
    case 'u32': return view.getUint32(spec.offset);
    case 'u64': return getU64(view, spec.offset, context);
    case 'bits64': return getU64Big(view, spec.offset);
  }
}

/**
 * Decodes the fixed fields from the first bytes of an image. Only the magic, version and
 * header_length are checked here; {@link parseHeader} checks the rest once cluster 0 is read.
 * `bytes` must hold at least 72 bytes (v2) or header_length bytes up to 112 (v3).
 */
export function decodeHeaderFields(bytes: Uint8Array): HeaderFields {
  if (bytes.length < 8) {
    throw new UnexpectedEofError(`The file is ${bytes.length} bytes long, too short for a qcow2 header`, {
      structure: 'header',
    });
  }
  const view = viewOf(bytes);
  const magic = view.getUint32(0);
  if (magic !== QCOW2_MAGIC) {
    throw new BadMagicError(`Not a qcow2 image: magic is 0x${magic.toString(16).padStart(8, '0')}, expected 0x514649fb`, {
      structure: 'header',
      field: 'magic',
      offset: 0,
    });
  }
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedVersionError(`Unsupported qcow2 version ${version} (only 2 and 3 exist)`, {
      structure: 'header',
      field: 'version',
      offset: 4,
    });
  }
  const needed = version === 2 ? V2_HEADER_LENGTH : V3_MIN_HEADER_LENGTH;
  if (bytes.length < needed) {
    throw new UnexpectedEofError(`The file ends inside the qcow2 header (${bytes.length} of ${needed} bytes)`, {
      structure: 'header',
    });
  }
  let headerLength = V2_HEADER_LENGTH;
  if (version === 3) {
    headerLength = view.getUint32(100);
    if (headerLength < V3_MIN_HEADER_LENGTH) {
      throw new CorruptImageError(`header_length ${headerLength} is below the v3 minimum of ${V3_MIN_HEADER_LENGTH}`, {
        structure: 'header',
        field: 'header_length',
        offset: 100,
      });
    }
    if (headerLength % 8 !== 0) {
      throw new CorruptImageError(`header_length ${headerLength} is not a multiple of 8`, {
        structure: 'header',
        field: 'header_length',
        offset: 100,
      });
    }
  }
  const known = Math.min(headerLength, bytes.length);
  const fields = {} as Record<keyof HeaderFields, number | bigint>;
  for (const spec of HEADER_FIELDS) fields[spec.key] = readField(view, spec, known);
  const result = fields as unknown as HeaderFields;
  result.headerLength = headerLength;
  if (version === 2) result.refcountOrder = DEFAULT_REFCOUNT_ORDER;
  return result;
}

/**
 * Parses cluster 0 (or the whole file when it is shorter): fixed fields, extensions and the
 * backing file name, with every check that needs nothing but these bytes.
 */
export function parseHeader(cluster0: Uint8Array): ParsedHeader {
  const fields = decodeHeaderFields(cluster0);
  validateHeaderFields(fields);
  const clusterSize = 2 ** fields.clusterBits;
  if (fields.headerLength > clusterSize) {
    throw new CorruptImageError(`header_length ${fields.headerLength} exceeds the cluster size ${clusterSize}`, {
      structure: 'header',
      field: 'header_length',
    });
  }
  // qemu reads extensions from header_length up to the backing file name (or cluster end).
  const extEnd = fields.backingFileOffset !== 0 ? fields.backingFileOffset : clusterSize;
  if (fields.backingFileOffset !== 0) {
    if (fields.backingFileOffset > clusterSize || fields.backingFileOffset < fields.headerLength) {
      throw new CorruptImageError(
        `backing_file_offset ${fields.backingFileOffset} lies outside the header cluster area [${fields.headerLength}, ${clusterSize}]`,
        { structure: 'header', field: 'backing_file_offset', offset: 8 },
      );
    }
    if (fields.backingFileSize > Math.min(MAX_BACKING_NAME, clusterSize - fields.backingFileOffset)) {
      throw new CorruptImageError(`backing_file_size ${fields.backingFileSize} is too long (limit ${MAX_BACKING_NAME} bytes, inside cluster 0)`, {
        structure: 'header',
        field: 'backing_file_size',
        offset: 16,
      });
    }
  }
  const available = Math.min(extEnd, cluster0.length);
  // qemu reads extensions after the header in v2 images too (starting at byte 72).
  const extensions = decodeExtensions(cluster0, fields.headerLength, available);

  let dataFileName: string | undefined;
  let backingFormat: string | undefined;
  let featureNames: FeatureName[] = [];
  for (const ext of extensions) {
    switch (ext.type) {
      case EXT_DATA_FILE:
        dataFileName = decodeName(ext.data);
        break;
      case EXT_BACKING_FORMAT:
        if (ext.data.length > MAX_BACKING_FORMAT_NAME) {
          throw new CorruptImageError(`The backing format name is ${ext.data.length} bytes; at most ${MAX_BACKING_FORMAT_NAME} are allowed`, {
            structure: 'header extension',
            field: 'backing format',
          });
        }
        backingFormat = decodeName(ext.data);
        break;
      case EXT_FEATURE_TABLE:
        featureNames = decodeFeatureTable(ext.data);
        break;
      case EXT_CRYPTO_HEADER:
        throw new UnsupportedFeatureError('The image is encrypted (it has a full-disk-encryption header); encrypted images are not supported', {
          structure: 'header extension',
          features: ['encryption'],
        });
    }
  }

  let backingFileName: string | undefined;
  if (fields.backingFileOffset !== 0) {
    const end = fields.backingFileOffset + fields.backingFileSize;
    if (end > cluster0.length) {
      throw new UnexpectedEofError('The file ends inside the backing file name', { structure: 'header', field: 'backing file name' });
    }
    backingFileName = decodeName(cluster0.subarray(fields.backingFileOffset, end));
  }

  const knownEnd = fields.version === 3 ? Math.min(fields.headerLength, V3_HEADER_LENGTH) : V2_HEADER_LENGTH;
  const unknownHeaderBytes = cluster0.slice(knownEnd, Math.min(fields.headerLength, cluster0.length));

  const parsed: ParsedHeader = {
    ...fields,
    clusterSize,
    extensions,
    dataFileName,
    backingFileName,
    backingFormat,
    featureNames,
    unknownHeaderBytes,
  };
  validateFeatures(parsed);
  return parsed;
}

/** Checks that need only the fixed fields (qemu's open-time checks, kept as hostile-input bounds). */
export function validateHeaderFields(h: HeaderFields): void {
  const at = (field: string, offset: number) => ({ structure: 'header', field, offset });
  if (h.clusterBits < MIN_CLUSTER_BITS || h.clusterBits > MAX_CLUSTER_BITS) {
    throw new CorruptImageError(
      `Unsupported cluster size: 2^${h.clusterBits} (cluster_bits must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}: 512 B to 2 MiB)`,
      at('cluster_bits', 20),
    );
  }
  if (h.refcountOrder > MAX_REFCOUNT_ORDER) {
    throw new CorruptImageError(`refcount_order ${h.refcountOrder} is above ${MAX_REFCOUNT_ORDER} (64-bit refcounts)`, at('refcount_order', 96));
  }
  if (h.cryptMethod !== CRYPT_NONE) {
    const kind = h.cryptMethod === 1 ? 'AES-CBC' : h.cryptMethod === 2 ? 'LUKS' : `method ${h.cryptMethod}`;
    throw new UnsupportedFeatureError(`The image is encrypted (${kind}); encrypted images are not supported`, {
      ...at('crypt_method', 32),
      features: ['encryption'],
    });
  }
  if (h.version === 2 && h.headerLength !== V2_HEADER_LENGTH) {
    throw new CorruptImageError('A v2 header must be 72 bytes', at('header_length', 100));
  }
  if (h.compressionType !== COMPRESSION_ZLIB && h.compressionType !== COMPRESSION_ZSTD) {
    throw new UnsupportedFeatureError(`Unknown compression_type ${h.compressionType} (0 = zlib, 1 = zstd)`, {
      ...at('compression_type', 104),
      features: [`compression type ${h.compressionType}`],
    });
  }
  const hasCompressionBit = (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (hasCompressionBit !== (h.compressionType !== COMPRESSION_ZLIB)) {
    throw new CorruptImageError(
      hasCompressionBit
        ? 'The compression-type feature bit is set but compression_type is zlib'
        : `compression_type is ${h.compressionType} but the compression-type feature bit is clear`,
      at('compression_type', 104),
    );
  }
}

const INCOMPAT_NAMES = ['dirty bit', 'corrupt bit', 'external data file', 'compression type', 'extended L2 entries'];

/** Feature-bit checks: unknown incompatible bits, extended L2 limits, raw bit without data file. */
function validateFeatures(h: ParsedHeader): void {
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if ((unknown >> BigInt(bit)) & 1n) {
        const named = h.featureNames.find((f) => f.kind === 'incompatible' && f.bit === bit);
        names.push(named ? named.name : `Unknown incompatible feature: ${bit}`);
      }
    }
    throw new UnsupportedFeatureError(`Unsupported qcow2 feature(s): ${names.join(', ')}`, {
      structure: 'header',
      field: 'incompatible_features',
      offset: 72,
      features: names,
    });
  }
  if ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n && h.clusterBits < MIN_EXTL2_CLUSTER_BITS) {
    throw new CorruptImageError(
      `Extended L2 entries need clusters of at least 16 KiB (subclusters of 512 bytes); this image has 2^${h.clusterBits}`,
      { structure: 'header', field: 'cluster_bits', offset: 20 },
    );
  }
  const hasDataFile = (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  if (!hasDataFile && (h.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n) {
    throw new CorruptImageError('The raw-external-data bit is set but the image has no external data file', {
      structure: 'header',
      field: 'autoclear_features',
      offset: 88,
    });
  }
  if (!hasDataFile && h.dataFileName !== undefined) {
    // qemu ignores the extension in this case; so do we, but it is worth knowing.
    h.dataFileName = undefined;
  }
}

/** Reads extensions from `start` until END or `end`. Each frame must fit before `end`. */
export function decodeExtensions(bytes: Uint8Array, start: number, end: number): HeaderExtension[] {
  const view = viewOf(bytes);
  const out: HeaderExtension[] = [];
  let pos = start;
  while (pos < end) {
    if (pos + 8 > end) {
      throw new CorruptImageError(`Header extension at byte ${pos} is cut off by the end of its area (${end})`, {
        structure: 'header extension',
        offset: pos,
      });
    }
    const type = view.getUint32(pos);
    const len = view.getUint32(pos + 4);
    if (type === EXT_END) break;
    if (len > end - pos - 8) {
      throw new CorruptImageError(`Header extension too large: type 0x${type.toString(16)} at byte ${pos} claims ${len} bytes`, {
        structure: 'header extension',
        offset: pos,
      });
    }
    out.push({ type, data: bytes.slice(pos + 8, pos + 8 + len) });
    pos += 8 + alignUp(len, 8);
  }
  return out;
}

function decodeFeatureTable(data: Uint8Array): FeatureName[] {
  const out: FeatureName[] = [];
  const kinds = ['incompatible', 'compatible', 'autoclear'] as const;
  for (let pos = 0; pos + FEATURE_TABLE_ENTRY_SIZE <= data.length; pos += FEATURE_TABLE_ENTRY_SIZE) {
    const kindByte = data[pos] ?? 0;
    const nameBytes = data.subarray(pos + 2, pos + 2 + FEATURE_NAME_LENGTH);
    const nul = nameBytes.indexOf(0);
    out.push({
      kind: kinds[kindByte] ?? kindByte,
      bit: data[pos + 1] ?? 0,
      name: decodeName(nul === -1 ? nameBytes : nameBytes.subarray(0, nul)),
    });
  }
  return out;
}

/** qemu's feature-name table: always these 8 entries, in this order. */
export const QEMU_FEATURE_TABLE: readonly FeatureName[] = [
  ...INCOMPAT_NAMES.map((name, bit) => ({ kind: 'incompatible' as const, bit, name })),
  { kind: 'compatible', bit: 0, name: 'lazy refcounts' },
  { kind: 'autoclear', bit: 0, name: 'bitmaps' },
  { kind: 'autoclear', bit: 1, name: 'raw external data' },
];

/** Encodes a feature-name table extension's data: 48 bytes per entry. */
export function encodeFeatureTable(entries: readonly FeatureName[]): Uint8Array {
  const out = new Uint8Array(entries.length * FEATURE_TABLE_ENTRY_SIZE);
  const kindCode = { incompatible: FEATURE_KIND_INCOMPATIBLE, compatible: FEATURE_KIND_COMPATIBLE, autoclear: FEATURE_KIND_AUTOCLEAR };
  entries.forEach((entry, i) => {
    const pos = i * FEATURE_TABLE_ENTRY_SIZE;
    out[pos] = typeof entry.kind === 'number' ? entry.kind : kindCode[entry.kind];
    out[pos + 1] = entry.bit;
    out.set(encodeName(entry.name).subarray(0, FEATURE_NAME_LENGTH), pos + 2);
  });
  return out;
}

/** What a writer puts in cluster 0. */
export interface HeaderSpec {
  /** log2 of the cluster size. */
  clusterBits: number;
  /** The virtual disk size in bytes. */
  size: number;
  /** Entries in the L1 table. */
  l1Size: number;
  /** File offset of the L1 table. */
  l1TableOffset: number;
  /** File offset of the refcount table. */
  refcountTableOffset: number;
  /** Clusters the refcount table occupies. */
  refcountTableClusters: number;
  /** log2 of the refcount width in bits. */
  refcountOrder: number;
  /** Incompatible feature bits (e.g. {@link INCOMPAT_DATA_FILE}). */
  incompatibleFeatures: bigint;
  /** Compatible feature bits. Default 0. */
  compatibleFeatures?: bigint;
  /** Autoclear feature bits (e.g. {@link AUTOCLEAR_DATA_FILE_RAW}). */
  autoclearFeatures: bigint;
  /** The external data file's name, written as its extension. */
  dataFileName?: string;
  /** The backing file's name, written after the extensions. */
  backingFileName?: string;
  /** The backing file's format, written as its extension. */
  backingFormat?: string;
  /** Write qemu's feature-name table. Default: when clusters are larger than 4 KiB, like qemu. */
  featureTable?: boolean;
  /**
   * `compression_type`: {@link COMPRESSION_ZLIB} (default) or {@link COMPRESSION_ZSTD}, which
   * also needs {@link INCOMPAT_COMPRESSION} in `incompatibleFeatures` (checked here).
   */
  compressionType?: number;
}

/**
 * Encodes cluster 0 of a v3 image: the 112-byte header, extensions in qemu's order
 * (backing format, data file, feature table), END, then the backing file name.
 * Throws InvalidArgumentError when the names do not fit in one cluster.
 */
export function encodeHeaderCluster(spec: HeaderSpec): Uint8Array {
  const clusterSize = 2 ** spec.clusterBits;
  const extensions: HeaderExtension[] = [];
  if (spec.backingFormat !== undefined) extensions.push({ type: EXT_BACKING_FORMAT, data: encodeName(spec.backingFormat) });
  if (spec.dataFileName !== undefined) extensions.push({ type: EXT_DATA_FILE, data: encodeName(spec.dataFileName) });
  if (spec.featureTable ?? clusterSize > 4096) {
    extensions.push({ type: EXT_FEATURE_TABLE, data: encodeFeatureTable(QEMU_FEATURE_TABLE) });
  }
  if (spec.backingFormat !== undefined && encodeName(spec.backingFormat).length > MAX_BACKING_FORMAT_NAME) {
    throw new InvalidArgumentError(`The backing format name '${spec.backingFormat}' is longer than ${MAX_BACKING_FORMAT_NAME} bytes`);
  }
  if ((spec.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n && (spec.incompatibleFeatures & INCOMPAT_DATA_FILE) === 0n) {
    throw new InvalidArgumentError('The raw-external-data bit needs the external-data-file bit');
  }
  const compressionType = spec.compressionType ?? COMPRESSION_ZLIB;
  if (compressionType !== COMPRESSION_ZLIB && compressionType !== COMPRESSION_ZSTD) {
    throw new InvalidArgumentError(`Unknown compression type ${compressionType} (0 = zlib, 1 = zstd)`);
  }
  if (((spec.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n) !== (compressionType !== COMPRESSION_ZLIB)) {
    throw new InvalidArgumentError('The compression-type feature bit must be set exactly when the compression type is not zlib');
  }
  const backingName = spec.backingFileName === undefined ? undefined : encodeName(spec.backingFileName);
  if (backingName && backingName.length > MAX_BACKING_NAME) {
    throw new InvalidArgumentError(`The backing file name is ${backingName.length} bytes; qcow2 allows at most ${MAX_BACKING_NAME}`);
  }
  const extBytes = extensions.reduce((n, e) => n + 8 + alignUp(e.data.length, 8), 0) + 8;
  const total = V3_HEADER_LENGTH + extBytes + (backingName?.length ?? 0);
  if (total > clusterSize) {
    throw new InvalidArgumentError(
      `The header, its extensions and names need ${total} bytes but a cluster holds ${clusterSize}; use a larger cluster size or shorter file names`,
    );
  }

  const out = new Uint8Array(clusterSize);
  const view = viewOf(out);
  const fields: HeaderFields = {
    magic: QCOW2_MAGIC,
    version: 3,
    backingFileOffset: backingName ? V3_HEADER_LENGTH + extBytes : 0,
    backingFileSize: backingName?.length ?? 0,
    clusterBits: spec.clusterBits,
    size: spec.size,
    cryptMethod: CRYPT_NONE,
    l1Size: spec.l1Size,
    l1TableOffset: spec.l1TableOffset,
    refcountTableOffset: spec.refcountTableOffset,
    refcountTableClusters: spec.refcountTableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: spec.incompatibleFeatures,
    compatibleFeatures: spec.compatibleFeatures ?? 0n,
    autoclearFeatures: spec.autoclearFeatures,
    refcountOrder: spec.refcountOrder,
    headerLength: V3_HEADER_LENGTH,
    compressionType,
  };
  encodeHeaderFields(view, fields);
  let pos = V3_HEADER_LENGTH;
  for (const ext of extensions) {
    view.setUint32(pos, ext.type);
    view.setUint32(pos + 4, ext.data.length);
    out.set(ext.data, pos + 8);
    pos += 8 + alignUp(ext.data.length, 8);
  }
  pos += 8; // END: type 0, length 0, already zero
  if (backingName) out.set(backingName, pos);
  return out;
}

/** Writes the fixed fields into `view` (which must span at least header_length bytes). */
export function encodeHeaderFields(view: DataView, fields: HeaderFields): void {
  for (const spec of HEADER_FIELDS) {
    if (spec.offset + FIELD_WIDTH[spec.kind] > fields.headerLength) continue;
    const value = fields[spec.key];
    switch (spec.kind) {
      case 'u8': view.setUint8(spec.offset, value as number); break;
      case 'u32': view.setUint32(spec.offset, value as number); break;
      case 'u64': setU64(view, spec.offset, value as number); break;
      case 'bits64': setU64Big(view, spec.offset, value as bigint); break;
    }
  }
}
