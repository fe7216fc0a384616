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
import { CorruptImageError, fileError } from '../errors.js';
import { readFully } from '../io/files.js';
import { openSeekable, readHeader, validateTables, type ImageFormat } from './image.js';
import type { SeekableFile } from './base-image.js';
import { probeFormat } from './probe.js';
import { openDisk } from './image.js';

/**
 * qemu-img info's JSON, field for field where qemu has one, with its names in camelCase
 * (`virtualSize` for `virtual-size`); the CLI's `info --json` prints qemu's own names.
 */
export interface ImageInfo {
  /** The path as given. */
  filename: string;
  /** The format probed (src/read/probe.ts) or forced: qcow2, raw, vpc, vmdk or vhdx. */
  format: ImageFormat;
  /** The guest disk size in bytes. */
  virtualSize: number;
  /** Bytes the image file occupies on disk (the data file is not counted, as in qemu). */
  actualSize: number;
  /** qcow2: bytes per cluster; VHD/VHDX: the block size; VMDK: the grain size. */
  clusterSize?: number;
  /** qcow2: the backing file name as stored (never opened). */
  backingFilename?: string;
  /** qcow2: the backing file format as stored. */
  backingFilenameFormat?: string;
  /**
   * qcow2: the backing file name as qemu resolves it — relative names against the image's
   * directory, taken from the path as given (never opened or checked).
   */
  fullBackingFilename?: string;
  /** qcow2: the internal snapshots (absent when there are none), as qemu-img info lists them. */
  snapshots?: SnapshotInfo[];
  /** qcow2: incompatible bit 0 is set (refcounts may be stale after a crash). */
  dirtyFlag?: boolean;
  /** qcow2: the fields `qemu-img info` shows under "Format specific information". */
  formatSpecific?: {
    /** Always `qcow2`. */
    type: 'qcow2';
    /** The qcow2 specifics. */
    data: {
      /** `0.10` for version 2, `1.1` for version 3. */
      compat: '0.10' | '1.1';
      /** The compression of compressed clusters. */
      compressionType: 'zlib' | 'zstd';
      /** Compatible bit 0: refcount updates may be deferred. */
      lazyRefcounts: boolean;
      /** Width of a refcount entry in bits. */
      refcountBits: number;
      /** Incompatible bit 1: the image was marked corrupt. */
      corrupt: boolean;
      /** Incompatible bit 4: extended L2 entries (subclusters). */
      extendedL2: boolean;
      /** The external data file's name as stored (never opened). */
      dataFile?: string;
      /** With a data file: autoclear bit 1, the data file alone is a valid raw image. */
      dataFileRaw?: boolean;
      /**
       * The persistent dirty bitmaps, as qemu-img info lists them (absent when there are none,
       * and, as in qemu, when autoclear bit 0 is clear: the bitmaps are then inconsistent).
       */
      bitmaps?: BitmapInfo[];
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

/** One persistent dirty bitmap, as qemu-img info lists it. */
export interface BitmapInfo {
  /** The bitmap's name. */
  name: string;
  /** Bytes of guest data per bit. */
  granularity: number;
  /** `in-use` (the bitmap was not saved cleanly) and `auto` (it tracks writes), in qemu's order. */
  flags: ('in-use' | 'auto')[];
}

/** One internal snapshot, with qemu-img info's field names. */
export interface SnapshotInfo {
  /** The snapshot's ID string. */
  id: string;
  /** Its name (qemu's TAG column). */
  name: string;
  /** Bytes of saved VM state. */
  vmStateSize: number;
  /** When it was taken: seconds since the epoch. */
  dateSec: number;
  /** The nanoseconds of the date. */
  dateNsec: number;
  /** The guest clock at the snapshot: whole seconds. */
  vmClockSec: number;
  /** The guest clock: nanoseconds past `vm-clock-sec`. */
  vmClockNsec: number;
  /** The instruction count (record/replay), when the snapshot stores one. */
  icount?: number;
}

/** Options of {@link readImageInfo}. */
export interface ReadImageInfoOptions {
  /** The image's format, instead of probing it (`raw` for untrusted raw files, as in openDisk). */
  format?: ImageFormat | undefined;
}

/** Reads an image's header (the format probed unless `options.format` is given). */
export async function readImageInfo(path: string, options: ReadImageInfoOptions = {}): Promise<ImageInfo> {
  const { format } = options;
  const file = await openSeekable(path, 'image');
  try {
    // An object is not sparse: it stores every byte of its size.
    let actualSize = file.size;
    if (file.kind !== 'object') {
      try {
        const stats = await stat(path);
        actualSize = stats.blocks * 512;
      } catch (err) {
        throw fileError(err, 'inspect', path);
      }
    }
    const chosen = format ?? (await probeFormat(path));
    if (chosen === 'vpc' || chosen === 'vmdk' || chosen === 'vhdx') {
      // Only the image (and a VMDK's extents, through the path policy), never a parent it names.
      const image = await openDisk(path, { format: chosen, withoutParents: true });
      await image.close();
      return { filename: path, format: chosen, virtualSize: image.virtualSize, actualSize, clusterSize: image.clusterSize };
    }
    const isQcow2 = chosen === 'qcow2';
    if (!isQcow2) return { filename: path, format: 'raw', virtualSize: file.size, actualSize };
    const header = await readHeader(file);
    validateTables(header, file.size, path, 'inspect');
    const info = qcow2Info(path, header, actualSize);
    const bitmaps = await readBitmaps(file, header);
    const data = info.formatSpecific?.data;
    if (bitmaps.length && data) data.bitmaps = bitmaps;
    const snapshots = await readSnapshots(file, header);
    if (snapshots.length) info.snapshots = snapshots;
    return info;
  } finally {
    await file.handle.close().catch(() => {});
  }
}

function qcow2Info(path: string, h: ParsedHeader, actualSize: number): ImageInfo {
  const has = (bits: bigint, bit: bigint) => (bits & bit) !== 0n;
  const info: ImageInfo = {
    filename: path,
    format: 'qcow2',
    virtualSize: h.size - (h.size % 512), // whole sectors, as qemu reports it
    actualSize,
    clusterSize: h.clusterSize,
  };
  if (h.backingFileName !== undefined) {
    info.backingFilename = h.backingFileName;
    info.fullBackingFilename = fullBackingName(path, h.backingFileName);
  }
  if (h.backingFormat !== undefined) info.backingFilenameFormat = h.backingFormat;
  info.dirtyFlag = has(h.incompatibleFeatures, INCOMPAT_DIRTY);
  const data: NonNullable<ImageInfo['formatSpecific']>['data'] = {
    compat: h.version === 2 ? '0.10' : '1.1',
    compressionType: h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib',
    lazyRefcounts: has(h.compatibleFeatures, COMPAT_LAZY_REFCOUNTS),
    refcountBits: 2 ** h.refcountOrder,
    corrupt: has(h.incompatibleFeatures, INCOMPAT_CORRUPT),
    extendedL2: has(h.incompatibleFeatures, INCOMPAT_EXTL2),
  };
  if (has(h.incompatibleFeatures, INCOMPAT_DATA_FILE)) {
    if (h.dataFileName !== undefined) data.dataFile = h.dataFileName;
    data.dataFileRaw = has(h.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
  }
  info.formatSpecific = { type: 'qcow2', data };
  const hex = (v: bigint) => `0x${v.toString(16)}`;
  info.features = { incompatible: hex(h.incompatibleFeatures), compatible: hex(h.compatibleFeatures), autoclear: hex(h.autoclearFeatures) };
  return info;
}

/** qemu's path_combine: a relative backing name is taken relative to the image's directory, as given. */
function fullBackingName(imagePath: string, backing: string): string {
  if (backing.startsWith('/')) return backing;
  const slash = imagePath.lastIndexOf('/');
  return slash < 0 ? backing : imagePath.slice(0, slash + 1) + backing;
}

/** qemu's bound on the bitmap directory (1 KiB per bitmap at most, 65,535 bitmaps). */
const MAX_BITMAPS = 65535;
const MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS;
const BITMAP_ENTRY_HEADER = 24;
const BITMAP_IN_USE = 1;
const BITMAP_AUTO = 2;

/**
 * The bitmap directory (spec: "Bitmaps extension" / "Bitmap directory"), when autoclear bit 0
 * says the bitmaps are consistent, as qemu lists them. Bounded like qemu's open: the directory
 * lies inside the file and is at most 64 MiB; a malformed one is a CorruptImageError.
 */
async function readBitmaps(file: SeekableFile, h: ParsedHeader): Promise<BitmapInfo[]> {
  const ext = h.extensions.find((e) => e.type === EXT_BITMAPS);
  if (!ext || (h.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n) return [];
  const corrupt = (message: string) => new CorruptImageError(`Bitmaps extension: ${message}`, { structure: 'header extension', field: 'bitmaps' });
  if (ext.data.length < 24) throw corrupt(`${ext.data.length} bytes, expected 24`);
  const view = new DataView(ext.data.buffer, ext.data.byteOffset, ext.data.byteLength);
  const count = view.getUint32(0);
  const size = Number(view.getBigUint64(8));
  const offset = Number(view.getBigUint64(16));
  if (count === 0 || count > MAX_BITMAPS) throw corrupt(`${count} bitmaps (1 to ${MAX_BITMAPS} allowed)`);
  if (size > MAX_BITMAP_DIRECTORY || size < count * BITMAP_ENTRY_HEADER) throw corrupt(`a directory of ${size} bytes for ${count} bitmaps`);
  if (offset % h.clusterSize !== 0 || offset === 0 || offset + size > file.size) throw corrupt(`the directory at ${offset} (${size} bytes) does not lie inside the file`);
  const dir = new Uint8Array(size);
  if ((await readFully(file.handle, dir, 0, size, offset, file.path)) < size) throw corrupt('the directory is cut short');
  const d = new DataView(dir.buffer);
  const names = new TextDecoder();
  const bitmaps: BitmapInfo[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    if (pos + BITMAP_ENTRY_HEADER > size) throw corrupt(`entry ${i} runs past the directory`);
    const flags = d.getUint32(pos + 12);
    const granularityBits = d.getUint8(pos + 17);
    const nameSize = d.getUint16(pos + 18);
    const extraSize = d.getUint32(pos + 20);
    const end = pos + BITMAP_ENTRY_HEADER + extraSize + nameSize;
    if (end > size || granularityBits > 63) throw corrupt(`entry ${i} is malformed`);
    const name = names.decode(dir.subarray(pos + BITMAP_ENTRY_HEADER + extraSize, end));
    const listed: BitmapInfo['flags'] = [];
    if (flags & BITMAP_IN_USE) listed.push('in-use');
    if (flags & BITMAP_AUTO) listed.push('auto');
    bitmaps.push({ name, granularity: 2 ** granularityBits, flags: listed });
    pos = Math.ceil(end / 8) * 8;
  }
  return bitmaps;
}

const SNAPSHOT_HEADER = 40;
const MAX_SNAPSHOT_EXTRA = 1024;
const MAX_SNAPSHOT_TABLE = 64 * 1024 * 1024;

/**
 * The snapshot table (spec: "Snapshots"), read entry by entry: at most nb_snapshots entries
 * (bounded by validateTables) and 64 MiB in all, each with at most 1 KiB of extra data, as
 * qemu's open requires.
 */
async function readSnapshots(file: SeekableFile, h: ParsedHeader): Promise<SnapshotInfo[]> {
  const snapshots: SnapshotInfo[] = [];
  const corrupt = (message: string) => new CorruptImageError(`Snapshot table: ${message}`, { structure: 'snapshot table', offset: h.snapshotsOffset });
  const fixed = new Uint8Array(SNAPSHOT_HEADER);
  const f = new DataView(fixed.buffer);
  const names = new TextDecoder();
  let pos = h.snapshotsOffset;
  for (let i = 0; i < h.nbSnapshots; i++) {
    if ((await readFully(file.handle, fixed, 0, SNAPSHOT_HEADER, pos, file.path)) < SNAPSHOT_HEADER) throw corrupt(`entry ${i} is cut short by the end of the file`);
    const idSize = f.getUint16(12);
    const nameSize = f.getUint16(14);
    const extraSize = f.getUint32(36);
    if (extraSize > MAX_SNAPSHOT_EXTRA) throw corrupt(`entry ${i} has ${extraSize} bytes of extra data (at most ${MAX_SNAPSHOT_EXTRA})`);
    const rest = new Uint8Array(extraSize + idSize + nameSize);
    if ((await readFully(file.handle, rest, 0, rest.length, pos + SNAPSHOT_HEADER, file.path)) < rest.length) throw corrupt(`entry ${i} is cut short by the end of the file`);
    const extra = new DataView(rest.buffer, 0, extraSize);
    const vmClock = f.getBigUint64(24);
    const entry: SnapshotInfo = {
      id: names.decode(rest.subarray(extraSize, extraSize + idSize)),
      name: names.decode(rest.subarray(extraSize + idSize)),
      vmStateSize: extraSize >= 8 ? Number(extra.getBigUint64(0)) : f.getUint32(32),
      dateSec: f.getUint32(16),
      dateNsec: f.getUint32(20),
      vmClockSec: Number(vmClock / 1_000_000_000n),
      vmClockNsec: Number(vmClock % 1_000_000_000n),
    };
    // qemu: no icount below 24 bytes of extra data, or all ones.
    if (extraSize >= 24 && extra.getBigUint64(16) !== 0xffff_ffff_ffff_ffffn) entry.icount = Number(extra.getBigUint64(16));
    snapshots.push(entry);
    pos += Math.ceil((SNAPSHOT_HEADER + rest.length) / 8) * 8;
    if (pos - h.snapshotsOffset > MAX_SNAPSHOT_TABLE) throw corrupt(`larger than ${MAX_SNAPSHOT_TABLE} bytes`);
  }
  return snapshots;
}
