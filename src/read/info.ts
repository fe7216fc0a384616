/**
 * `info`: what an image's header says, read from the image file alone. It never opens the data
 * file or the backing file (CVE-2024-4467: inspecting an untrusted image must not touch the
 * files it names), so it works when they are missing and is safe on hostile images.
 */

import { stat } from 'node:fs/promises';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZSTD,
  EXT_BITMAPS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  type ParsedHeader,
} from '../format/index.js';
import { fileError } from '../errors.js';
import { readFully } from '../io/files.js';
import { openSeekable, readHeader, validateTables, type ImageFormat } from './image.js';
import { QCOW2_MAGIC } from '../format/index.js';

/** qemu-img info's JSON, field for field where qemu has one. */
export interface ImageInfo {
  /** The path as given. */
  filename: string;
  /** `qcow2`, or `raw` for anything without the qcow2 magic (unless a format was forced). */
  format: ImageFormat;
  /** The guest disk size in bytes. */
  'virtual-size': number;
  /** Bytes the image file occupies on disk (the data file is not counted, as in qemu). */
  'actual-size': number;
  /** qcow2: bytes per cluster. */
  'cluster-size'?: number;
  /** qcow2: the backing file name as stored (never opened). */
  'backing-filename'?: string;
  /** qcow2: the backing file format as stored. */
  'backing-filename-format'?: string;
  /** qcow2: incompatible bit 0 is set (refcounts may be stale after a crash). */
  'dirty-flag'?: boolean;
  /** qcow2: the fields `qemu-img info` shows under "Format specific information". */
  'format-specific'?: {
    /** Always `qcow2`. */
    type: 'qcow2';
    /** The qcow2 specifics. */
    data: {
      /** `0.10` for version 2, `1.1` for version 3. */
      compat: '0.10' | '1.1';
      /** The compression of compressed clusters. */
      'compression-type': 'zlib' | 'zstd';
      /** Compatible bit 0: refcount updates may be deferred. */
      'lazy-refcounts': boolean;
      /** Width of a refcount entry in bits. */
      'refcount-bits': number;
      /** Incompatible bit 1: the image was marked corrupt. */
      corrupt: boolean;
      /** Incompatible bit 4: extended L2 entries (subclusters). */
      'extended-l2': boolean;
      /** The external data file's name as stored (never opened). */
      'data-file'?: string;
      /** With a data file: autoclear bit 1, the data file alone is a valid raw image. */
      'data-file-raw'?: boolean;
      /** Ours: the image keeps bitmaps (autoclear bit 0 tells whether they are consistent). */
      bitmaps?: {
        /** Autoclear bit 0 is set: the bitmaps were kept up to date. */
        consistent: boolean;
      };
    };
  };
  /** Ours: the feature bits as hex, for people debugging images. */
  features?: {
    /** `incompatible_features`, e.g. `0x4` (external data file). */
    incompatible: string;
    /** `compatible_features`. */
    compatible: string;
    /** `autoclear_features`, e.g. `0x2` (raw external data). */
    autoclear: string;
  };
}

/** Reads an image's header (probing qcow2 vs raw unless `format` is given). */
export async function readImageInfo(path: string, format?: ImageFormat): Promise<ImageInfo> {
  const file = await openSeekable(path, 'image');
  try {
    let actualSize = file.size;
    try {
      const stats = await stat(path);
      actualSize = stats.blocks * 512;
    } catch (err) {
      throw fileError(err, 'inspect', path);
    }
    const magic = new Uint8Array(4);
    const got = await readFully(file.handle, magic, 0, 4, 0, path);
    const isQcow2 = format === 'qcow2' || (format === undefined && got === 4 && new DataView(magic.buffer).getUint32(0) === QCOW2_MAGIC);
    if (!isQcow2) return { filename: path, format: 'raw', 'virtual-size': file.size, 'actual-size': actualSize };
    const header = await readHeader(file);
    validateTables(header, file.size, path, 'inspect');
    return qcow2Info(path, header, actualSize);
  } finally {
    await file.handle.close().catch(() => {});
  }
}

function qcow2Info(path: string, h: ParsedHeader, actualSize: number): ImageInfo {
  const has = (bits: bigint, bit: bigint) => (bits & bit) !== 0n;
  const info: ImageInfo = {
    filename: path,
    format: 'qcow2',
    'virtual-size': h.size - (h.size % 512), // whole sectors, as qemu reports it
    'actual-size': actualSize,
    'cluster-size': h.clusterSize,
  };
  if (h.backingFileName !== undefined) info['backing-filename'] = h.backingFileName;
  if (h.backingFormat !== undefined) info['backing-filename-format'] = h.backingFormat;
  info['dirty-flag'] = has(h.incompatibleFeatures, INCOMPAT_DIRTY);
  const data: NonNullable<ImageInfo['format-specific']>['data'] = {
    compat: h.version === 2 ? '0.10' : '1.1',
    'compression-type': h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib',
    'lazy-refcounts': has(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS),
    'refcount-bits': 2 ** h.refcountOrder,
    corrupt: has(h.incompatibleFeatures, INCOMPAT_CORRUPT),
    'extended-l2': has(h.incompatibleFeatures, INCOMPAT_EXTL2),
  };
  if (has(h.incompatibleFeatures, INCOMPAT_DATA_FILE)) {
    if (h.dataFileName !== undefined) data['data-file'] = h.dataFileName;
    data['data-file-raw'] = has(h.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  }
  if (h.extensions.some((e) => e.type === EXT_BITMAPS)) data.bitmaps = { consistent: has(h.autoclearFeatures, AUTOCLEAR_BITMAPS) };
  info['format-specific'] = { type: 'qcow2', data };
  const hex = (v: bigint) => `0x${v.toString(16)}`;
  info.features = { incompatible: hex(h.incompatibleFeatures), compatible: hex(h.compatibleFeatures), autoclear: hex(h.autoclearFeatures) };
  return info;
}
