/**
 * The VHDX reader: dynamic, fixed and differencing disks, after [MS-VHDX] (Microsoft's VHDX
 * format specification v1.0) and qemu's block/vhdx.c.
 *
 * Layout (little-endian; GUIDs in Microsoft's mixed-endian order): the file identifier
 * `vhdxfile` at 0; two headers at 64 and 128 KiB (`head`, CRC-32C, the current one has the
 * higher sequence number); two region tables at 192 and 256 KiB (`regi`, CRC-32C) locating the
 * block allocation table (BAT) and the metadata region; the metadata items give the block size,
 * the virtual size, the logical sector size and, for a differencing disk, the parent locator.
 *
 * The BAT holds one 64-bit entry per payload block (state in bits 0–2, file offset in MiB in
 * bits 20–63), with a sector-bitmap entry after every `chunk ratio` payload entries. States:
 * fully present (data), zero / unmapped / undefined (zeros), not present (zeros, or the parent's
 * bytes in a differencing disk) and partially present (differencing: the sector bitmap says which
 * sectors are here, the others are the parent's).
 *
 * A header with a non-zero log GUID has a log to replay: the image was not closed cleanly and
 * its BAT and metadata may be stale. Replaying needs write access, so such an image is refused
 * with a clear error naming the fix. The parent's name (relative_path, then absolute_win32_path)
 * goes through the path policy.
 */

import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { CorruptImageError, LimitExceededError, UnsupportedFeatureError } from '../errors.js';
import { readExactly } from '../io/files.js';
import { resolveStoredName } from '../io/path-policy.js';
import { LruCache } from './cache.js';
import { BaseImage, ByteSource, openSeekable, plain, throughBacking, type OpenContext, type Segment } from './base-image.js';
import type { DiskImage } from './image.js';
import type { CheckableImage, StructureCheck } from './structure-check.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const HEADER_OFFSETS = [64 * KiB, 128 * KiB];
const HEADER_SIZE = 4 * KiB;
const REGION_OFFSETS = [192 * KiB, 256 * KiB];
const REGION_SIZE = 64 * KiB;
const MAX_REGION_ENTRIES = 2047;
const MAX_METADATA_ENTRIES = 2047;
/** The largest virtual disk VHDX describes: 64 TiB. */
const MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB;
/** The largest BAT read. 64 TiB in 32 MiB blocks is 2 Mi entries = 16 MiB; keep room. */
export const MAX_VHDX_BAT_BYTES = 64 * MiB;
/** The largest metadata region read. */
const MAX_METADATA_BYTES = 16 * MiB;
/** Most parent-locator bytes read. */
const MAX_LOCATOR_BYTES = 64 * KiB;

const GUID_BAT = '2dc27766-f623-4200-9d64-115e9bfd4a08';
const GUID_METADATA = '8b7ca206-4790-4b9a-b8fe-575f050f886e';
const META_FILE_PARAMETERS = 'caa16737-fa36-4d43-b3b6-33f0aa44e76b';
const META_VIRTUAL_DISK_SIZE = '2fa54224-cd1b-4876-b211-5dbed83bf4b8';
const META_LOGICAL_SECTOR_SIZE = '8141bf1d-a96f-4709-ba47-f233a8faab5f';
const META_PHYSICAL_SECTOR_SIZE = 'cda348c7-445d-4471-9cc9-e9885251c556';
const META_VIRTUAL_DISK_ID = 'beca12ab-b2e6-4523-93ef-c309e000c746';
const META_PARENT_LOCATOR = 'a8d35f2d-b30b-454d-abf7-d3d84834ab0c';
const KNOWN_METADATA = new Set([META_FILE_PARAMETERS, META_VIRTUAL_DISK_SIZE, META_LOGICAL_SECTOR_SIZE, META_PHYSICAL_SECTOR_SIZE, META_VIRTUAL_DISK_ID, META_PARENT_LOCATOR]);

const PAYLOAD_NOT_PRESENT = 0;
const PAYLOAD_UNDEFINED = 1;
const PAYLOAD_ZERO = 2;
const PAYLOAD_UNMAPPED = 3;
const PAYLOAD_FULLY_PRESENT = 6;
const PAYLOAD_PARTIALLY_PRESENT = 7;
const SB_PRESENT = 6;

let crcTable: Uint32Array | undefined;

/** CRC-32C (Castagnoli), as VHDX checksums its headers and region tables. */
export function crc32c(bytes: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) crc = crcTable[(crc ^ bytes[i]!) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/** True when the CRC-32C of `bytes`, with the 4-byte checksum at `at` read as zero, matches it. */
function checksumOk(bytes: Uint8Array, at: number): boolean {
  const copy = Uint8Array.from(bytes);
  const stored = new DataView(copy.buffer).getUint32(at, true);
  copy.fill(0, at, at + 4);
  return crc32c(copy) === stored;
}

/** A GUID in its usual text form from its 16 on-disk bytes (first three fields little-endian). */
export function guidAt(bytes: Uint8Array, at: number): string {
  const b = bytes.subarray(at, at + 16);
  const h = (i: number) => b[i]!.toString(16).padStart(2, '0');
  return `${h(3)}${h(2)}${h(1)}${h(0)}-${h(5)}${h(4)}-${h(7)}${h(6)}-${h(8)}${h(9)}-${[10, 11, 12, 13, 14, 15].map(h).join('')}`;
}

function u64(view: DataView, at: number): number {
  const value = view.getBigUint64(at, true);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(value);
}

/** Where the file's fixed structures lie, for `check`. */
interface VhdxLayout {
  log: Region;
  bat: Region;
  metadata: Region;
  /** The file parameters' HasParent bit (a differencing disk), whether or not the parent was opened. */
  hasParent: boolean;
}

class VhdxImage extends BaseImage implements CheckableImage {
  readonly format = 'vhdx' as const;
  readonly header = undefined;
  readonly dataFilePath = undefined;
  readonly clusterSize: number;
  private readonly bitmaps = new LruCache<Uint8Array>(8);

  constructor(
    path: string,
    warnings: string[],
    readonly virtualSize: number,
    private readonly file: ByteSource,
    private readonly blockSize: number,
    private readonly chunkRatio: number,
    private readonly logicalSector: number,
    private readonly bat: DataView,
    readonly backing: BaseImage | undefined,
    /** The data-write GUID the parent locator of a child records (parent_linkage). */
    readonly dataWriteGuid: string,
    private readonly layout: VhdxLayout,
  ) {
    super(path, warnings);
    this.clusterSize = blockSize;
  }

  async *segments(start: number, end: number): AsyncGenerator<Segment> {
    yield* throughBacking(this.ownSegments(start, end), this.backing);
  }

  private entry(index: number): { state: number; offset: number } {
    const lo = this.bat.getUint32(index * 8, true);
    const hi = this.bat.getUint32(index * 8 + 4, true);
    // bits 20–63: the offset in MiB.
    const mb = hi * 4096 + (lo >>> 20);
    return { state: lo & 7, offset: mb * MiB };
  }

  private async *ownSegments(start: number, end: number): AsyncGenerator<Segment> {
    const bs = this.blockSize;
    for (let pos = start; pos < end; ) {
      const block = Math.floor(pos / bs);
      const blockStart = block * bs;
      const blockEnd = Math.min(end, blockStart + bs);
      const { state, offset } = this.entry(block + Math.floor(block / this.chunkRatio));
      const corrupt = (message: string) => new CorruptImageError(`${message} (BAT entry of block ${block} in '${this.path}')`, { structure: 'VHDX BAT' });
      switch (state) {
        case PAYLOAD_NOT_PRESENT:
        case PAYLOAD_UNDEFINED:
        case PAYLOAD_UNMAPPED:
        case PAYLOAD_ZERO: {
          // A run of blocks in the same state in one step (a huge sparse disk must not cost a
          // generator turn per block).
          const kind = state === PAYLOAD_NOT_PRESENT ? 'unallocated' : 'zero';
          let runEnd = blockEnd;
          for (let next = block + 1; runEnd < end; next++) {
            const s = this.entry(next + Math.floor(next / this.chunkRatio)).state;
            if ((s === PAYLOAD_NOT_PRESENT ? 'unallocated' : s === PAYLOAD_ZERO || s === PAYLOAD_UNMAPPED || s === PAYLOAD_UNDEFINED ? 'zero' : 'data') !== kind) break;
            runEnd = Math.min(end, (next + 1) * bs);
          }
          yield plain(pos, runEnd - pos, kind);
          pos = runEnd;
          continue;
        }
        case PAYLOAD_FULLY_PRESENT:
        case PAYLOAD_PARTIALLY_PRESENT: {
          if (offset < 1 * MiB || offset + Math.min(bs, this.virtualSize - blockStart) > this.file.size) {
            throw corrupt(`The block's data at byte ${offset} lies outside the file (${this.file.size} bytes)`);
          }
          if (state === PAYLOAD_FULLY_PRESENT || !this.backing) {
            if (state === PAYLOAD_PARTIALLY_PRESENT) throw corrupt('A partially present block in a disk without a parent');
            yield { start: pos, length: blockEnd - pos, kind: 'data', depth: 0, source: this.file, hostOffset: offset + (pos - blockStart), compressed: undefined };
            break;
          }
          yield* this.partialSegments(block, offset, pos, blockEnd);
          break;
        }
        default:
          throw corrupt(`Unknown payload block state ${state}`);
      }
      pos = blockEnd;
    }
  }

  /**
   * `check`, after qemu's vhdx_check_bat_entries: a present block must lie inside the file
   * (the last one may be short) and outside the headers, log, BAT and metadata; beyond qemu,
   * no two blocks (or sector bitmaps) may share bytes, a partially present block needs a parent,
   * and a state must be one the format defines.
   */
  async checkStructures(check: StructureCheck): Promise<boolean> {
    const space = check.space(this.path, this.file.size);
    const bs = this.blockSize;
    const { log, bat, metadata } = this.layout;
    space.claim(space.group('headers and region tables', MiB), 0, () => 'the headers and region tables');
    space.claim(space.group('log', log.length), log.offset, () => 'the log');
    space.claim(space.group('BAT', bat.length), bat.offset, () => 'the BAT');
    space.claim(space.group('metadata region', metadata.length), metadata.offset, () => 'the metadata region');
    const blockGroup = space.group('payload block', bs);
    const payloadBlocks = Math.ceil(this.virtualSize / bs);
    const lastLength = this.virtualSize - (payloadBlocks - 1) * bs;
    const lastGroup = space.group('payload block', lastLength);
    const bitmapGroup = space.group('sector bitmap block', MiB);
    const differencing = this.layout.hasParent;
    check.result.totalClusters = payloadBlocks;
    check.result.imageEndOffset = this.file.size;
    for (let block = 0; block < payloadBlocks; block++) {
      const index = block + Math.floor(block / this.chunkRatio);
      const { state, offset } = this.entry(index);
      if (state === PAYLOAD_NOT_PRESENT || state === PAYLOAD_UNDEFINED || state === PAYLOAD_ZERO || state === PAYLOAD_UNMAPPED) continue;
      if (state !== PAYLOAD_FULLY_PRESENT && state !== PAYLOAD_PARTIALLY_PRESENT) {
        check.error('VHDX BAT', bat.offset + index * 8, `ERROR: VHDX BAT entry ${index} has the unknown payload block state ${state}`);
        continue;
      }
      if (state === PAYLOAD_PARTIALLY_PRESENT && !differencing) {
        check.error('VHDX BAT', bat.offset + index * 8, `ERROR: VHDX BAT entry ${index} is partially present in a disk without a parent`);
      }
      const length = block === payloadBlocks - 1 ? lastLength : bs;
      const kept = space.claim(block === payloadBlocks - 1 ? lastGroup : blockGroup, offset, () => `VHDX BAT entry ${index}`, {
        pastEnd: () => `VHDX BAT entry ${index} start offset ${offset} points after end of file (${this.file.size}). Image has probably been truncated.`,
        tolerateTail: true,
      });
      if (kept && offset + length > this.file.size) {
        check.error('VHDX BAT', bat.offset + index * 8, `VHDX BAT entry ${index} end offset ${offset + length} points after end of file (${this.file.size}). Image has probably been truncated.`);
      }
      if (kept) check.allocated(offset, length);
    }
    if (differencing) {
      for (let chunk = 0; chunk * this.chunkRatio < payloadBlocks; chunk++) {
        const index = chunk * (this.chunkRatio + 1) + this.chunkRatio;
        const { state, offset } = this.entry(index);
        if (state !== SB_PRESENT) continue;
        space.claim(bitmapGroup, offset, () => `the sector bitmap of VHDX BAT entry ${index}`);
      }
    }
    return true;
  }

  /** A partially present block: runs of sectors present here (data) or not (the parent's). */
  private async *partialSegments(block: number, offset: number, from: number, to: number): AsyncGenerator<Segment> {
    const chunk = Math.floor(block / this.chunkRatio);
    const sb = this.entry(chunk * (this.chunkRatio + 1) + this.chunkRatio);
    if (sb.state !== SB_PRESENT || sb.offset < 1 * MiB || sb.offset + MiB > this.file.size) {
      throw new CorruptImageError(`Block ${block} of '${this.path}' is partially present but its sector bitmap is missing or outside the file`, { structure: 'VHDX BAT' });
    }
    let bitmap = this.bitmaps.get(sb.offset);
    if (!bitmap) {
      bitmap = await readExactly(this.file.handle, MiB, sb.offset, this.path, 'VHDX sector bitmap');
      this.bitmaps.set(sb.offset, bitmap);
    }
    const ls = this.logicalSector;
    const chunkStart = chunk * this.chunkRatio * this.blockSize;
    const blockStart = block * this.blockSize;
    const bit = (sector: number) => (bitmap[sector >> 3]! >> (sector & 7)) & 1;
    for (let pos = from; pos < to; ) {
      const sector = Math.floor((pos - chunkStart) / ls);
      const present = bit(sector);
      let runEnd = Math.min(to, chunkStart + (sector + 1) * ls);
      for (let s = sector + 1; runEnd < to && bit(s) === present; s++) runEnd = Math.min(to, chunkStart + (s + 1) * ls);
      if (present) yield { start: pos, length: runEnd - pos, kind: 'data', depth: 0, source: this.file, hostOffset: offset + (pos - blockStart), compressed: undefined };
      else yield plain(pos, runEnd - pos, 'unallocated');
      pos = runEnd;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.file.handle.close().catch(() => {});
    await this.backing?.close();
  }
}

interface Region {
  offset: number;
  length: number;
}

/** Opens a VHDX at `path`; a differencing disk's parent is `explicitParent` or its locator's name. */
export async function openVhdx(path: string, context: OpenContext, depth = 0, explicitParent?: string): Promise<DiskImage> {
  const maxDepth = context.options.maxChainDepth ?? 16;
  if (depth > maxDepth) {
    throw new LimitExceededError(`The VHDX parent chain is deeper than ${maxDepth} images (at '${path}')`, { structure: 'backing chain', limit: maxDepth, actual: depth });
  }
  const file = await openSeekable(path, 'image', context.storedNames.get(path));
  let parent: BaseImage | undefined;
  try {
    const corrupt = (message: string, structure: string, offset?: number) =>
      new CorruptImageError(`${message} (in '${path}')`, { structure, ...(offset === undefined ? {} : { offset }) });
    if (file.size < 1 * MiB) throw corrupt(`The file is ${file.size} bytes, too short for a VHDX (headers and region tables take 1 MiB)`, 'VHDX file identifier');
    const ident = await readExactly(file.handle, 8, 0, path, 'VHDX file identifier');
    if (Buffer.from(ident).toString('latin1') !== 'vhdxfile') throw corrupt('The file does not start with "vhdxfile"', 'VHDX file identifier', 0);

    // The current header: the valid one with the higher sequence number.
    let current: { view: DataView; bytes: Uint8Array; sequence: bigint } | undefined;
    for (const at of HEADER_OFFSETS) {
      const bytes = await readExactly(file.handle, HEADER_SIZE, at, path, 'VHDX header');
      if (Buffer.from(bytes.subarray(0, 4)).toString('latin1') !== 'head' || !checksumOk(bytes, 4)) continue;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const sequence = view.getBigUint64(8, true);
      if (!current || sequence > current.sequence) current = { view, bytes, sequence };
    }
    if (!current) throw corrupt('Neither VHDX header (at 64 KiB and 128 KiB) is valid (signature "head", CRC-32C)', 'VHDX header', HEADER_OFFSETS[0]);
    const logGuid = guidAt(current.bytes, 48);
    if (logGuid !== '00000000-0000-0000-0000-000000000000') {
      throw new UnsupportedFeatureError(`'${path}' has a VHDX log to replay (it was not closed cleanly), so its tables may be stale; replaying needs write access`, {
        structure: 'VHDX header',
        field: 'LogGuid',
        features: ['dirty VHDX log'],
        hint: `Replay the log first on a copy: qemu-img check -r all '${path}' (or attach it once in Hyper-V)`,
      });
    }
    if (current.view.getUint16(66, true) !== 1) {
      throw new UnsupportedFeatureError(`'${path}' is VHDX version ${current.view.getUint16(66, true)}; version 1 is read`, { structure: 'VHDX header', field: 'Version' });
    }
    const dataWriteGuid = guidAt(current.bytes, 32);

    // Region table: the first valid copy.
    let regions: Map<string, Region> | undefined;
    for (const at of REGION_OFFSETS) {
      const bytes = await readExactly(file.handle, REGION_SIZE, at, path, 'VHDX region table');
      if (Buffer.from(bytes.subarray(0, 4)).toString('latin1') !== 'regi' || !checksumOk(bytes, 4)) continue;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const count = view.getUint32(8, true);
      if (count > MAX_REGION_ENTRIES) throw corrupt(`The region table lists ${count} entries, above the ${MAX_REGION_ENTRIES} the format allows`, 'VHDX region table', at);
      regions = new Map();
      for (let i = 0; i < count; i++) {
        const entry = 16 + i * 32;
        const guid = guidAt(bytes, entry);
        const region = { offset: u64(view, entry + 16), length: view.getUint32(entry + 24, true) };
        const required = (view.getUint32(entry + 28, true) & 1) !== 0;
        if (guid !== GUID_BAT && guid !== GUID_METADATA) {
          if (required) throw new UnsupportedFeatureError(`'${path}' has a required VHDX region ${guid} this reader does not know`, { structure: 'VHDX region table', features: [`region ${guid}`] });
          continue;
        }
        if (region.offset < 1 * MiB || region.offset % MiB !== 0 || region.offset + region.length > file.size) {
          throw corrupt(`The ${guid === GUID_BAT ? 'BAT' : 'metadata'} region (${region.length} bytes at ${region.offset}) is not a 1 MiB-aligned range inside the file`, 'VHDX region table', at + entry);
        }
        regions.set(guid, region);
      }
      break;
    }
    if (!regions) throw corrupt('Neither VHDX region table (at 192 KiB and 256 KiB) is valid (signature "regi", CRC-32C)', 'VHDX region table', REGION_OFFSETS[0]);
    const batRegion = regions.get(GUID_BAT);
    const metaRegion = regions.get(GUID_METADATA);
    if (!batRegion || !metaRegion) throw corrupt('The region table lacks the BAT or the metadata region', 'VHDX region table');

    // Metadata.
    if (metaRegion.length > MAX_METADATA_BYTES || metaRegion.length < 64 * KiB) {
      throw corrupt(`The metadata region is ${metaRegion.length} bytes (expected 64 KiB to ${MAX_METADATA_BYTES})`, 'VHDX metadata');
    }
    const meta = await readExactly(file.handle, metaRegion.length, metaRegion.offset, path, 'VHDX metadata');
    const metaView = new DataView(meta.buffer, meta.byteOffset, meta.byteLength);
    if (Buffer.from(meta.subarray(0, 8)).toString('latin1') !== 'metadata') throw corrupt('The metadata region does not start with "metadata"', 'VHDX metadata', metaRegion.offset);
    const metaCount = metaView.getUint16(10, true);
    if (metaCount > MAX_METADATA_ENTRIES) throw corrupt(`The metadata table lists ${metaCount} entries, above ${MAX_METADATA_ENTRIES}`, 'VHDX metadata', metaRegion.offset);
    const items = new Map<string, { offset: number; length: number }>();
    for (let i = 0; i < metaCount; i++) {
      const entry = 32 + i * 32;
      const guid = guidAt(meta, entry);
      const offset = metaView.getUint32(entry + 16, true);
      const length = metaView.getUint32(entry + 20, true);
      const required = (metaView.getUint32(entry + 24, true) & 4) !== 0;
      if (!KNOWN_METADATA.has(guid)) {
        if (required) throw new UnsupportedFeatureError(`'${path}' has a required VHDX metadata item ${guid} this reader does not know`, { structure: 'VHDX metadata', features: [`metadata ${guid}`] });
        continue;
      }
      if (length > 0 && (offset < 64 * KiB || offset + length > meta.length)) throw corrupt(`Metadata item ${guid} (${length} bytes at ${offset}) lies outside the metadata region`, 'VHDX metadata');
      items.set(guid, { offset, length });
    }
    const item = (guid: string, name: string, length: number) => {
      const found = items.get(guid);
      if (!found || found.length < length) throw corrupt(`The metadata item ${name} is missing or too short`, 'VHDX metadata');
      return found.offset;
    };
    const params = item(META_FILE_PARAMETERS, 'File Parameters', 8);
    const blockSize = metaView.getUint32(params, true);
    const hasParent = (metaView.getUint32(params + 4, true) & 2) !== 0;
    const virtualSize = u64(metaView, item(META_VIRTUAL_DISK_SIZE, 'Virtual Disk Size', 8));
    const logicalSector = metaView.getUint32(item(META_LOGICAL_SECTOR_SIZE, 'Logical Sector Size', 4), true);
    if (blockSize < MiB || blockSize > 256 * MiB || (blockSize & (blockSize - 1)) !== 0) throw corrupt(`The block size ${blockSize} is not a power of two from 1 MiB to 256 MiB`, 'VHDX metadata');
    if (logicalSector !== 512 && logicalSector !== 4096) throw corrupt(`The logical sector size ${logicalSector} is neither 512 nor 4096`, 'VHDX metadata');
    if (virtualSize === 0 || virtualSize > MAX_VIRTUAL_SIZE || virtualSize % logicalSector !== 0) {
      throw corrupt(`The virtual size ${virtualSize} is not a multiple of the sector size up to 64 TiB`, 'VHDX metadata');
    }

    // BAT.
    const chunkRatio = (2 ** 23 * logicalSector) / blockSize;
    const payloadBlocks = Math.ceil(virtualSize / blockSize);
    const sbBlocks = Math.ceil(payloadBlocks / chunkRatio);
    const entries = hasParent ? sbBlocks * (chunkRatio + 1) : payloadBlocks + Math.floor((payloadBlocks - 1) / chunkRatio);
    const batBytes = entries * 8;
    if (batBytes > MAX_VHDX_BAT_BYTES) {
      throw new LimitExceededError(`The VHDX BAT needs ${batBytes} bytes, above the ${MAX_VHDX_BAT_BYTES}-byte limit`, { structure: 'VHDX BAT', limit: MAX_VHDX_BAT_BYTES, actual: batBytes });
    }
    if (batBytes > batRegion.length) throw corrupt(`The BAT region (${batRegion.length} bytes) is smaller than the ${batBytes} bytes the disk needs`, 'VHDX BAT');
    const batRaw = await readExactly(file.handle, batBytes, batRegion.offset, path, 'VHDX BAT');
    const bat = new DataView(batRaw.buffer, batRaw.byteOffset, batRaw.byteLength);

    if (hasParent && !context.options.withoutParents) {
      const stored = await parentName(path, meta, items.get(META_PARENT_LOCATOR), context, explicitParent !== undefined);
      const parentPath = explicitParent ?? stored.path!;
      if (explicitParent === undefined) context.storedNames.set(parentPath, 'parent disk');
      const chain = [...context.chain, await realpath(path).catch(() => resolve(path))];
      if (chain.includes(await realpath(parentPath).catch(() => resolve(parentPath)))) {
        throw corrupt(`The VHDX parent chain loops: '${parentPath}' is this disk or one above it`, 'VHDX parent locator');
      }
      parent = (await openVhdx(parentPath, { ...context, chain }, depth + 1)) as BaseImage;
      const linkage = stored.linkage?.replace(/[{}]/g, '').toLowerCase();
      if (linkage && linkage !== (parent as VhdxImage).dataWriteGuid) {
        throw corrupt(`The parent '${parentPath}' has data-write GUID ${(parent as VhdxImage).dataWriteGuid}, but the disk was made over ${linkage} (the parent changed or is the wrong file)`, 'VHDX parent locator');
      }
    }
    const source = new ByteSource(file.handle, path, file.size, 'image file', context.warn);
    const log = { offset: u64(current.view, 72), length: current.view.getUint32(68, true) };
    return new VhdxImage(path, context.warnings, virtualSize, source, blockSize, chunkRatio, logicalSector, bat, parent, dataWriteGuid, { log, bat: batRegion, metadata: metaRegion, hasParent });
  } catch (err) {
    await parent?.close();
    await file.handle.close().catch(() => {});
    throw err;
  }
}

/** The parent's path from the parent locator: relative_path, then absolute_win32_path, through the path policy. */
/**
 * The parent locator's pairs: the parent's path (unless `explicit`: the caller chose the
 * parent) and its `parent_linkage`, which the parent's data-write GUID must match.
 */
async function parentName(path: string, meta: Uint8Array, locator: { offset: number; length: number } | undefined, context: OpenContext, explicit: boolean): Promise<{ path: string | undefined; linkage: string | undefined }> {
  if (explicit && !locator) return { path: undefined, linkage: undefined };
  const missing = () =>
    new UnsupportedFeatureError(`'${path}' is a differencing VHDX that does not name its parent`, { structure: 'VHDX parent locator', hint: 'Pass the parent with --backing PATH (API: backing)' });
  if (!locator || locator.length < 20) throw missing();
  if (locator.length > MAX_LOCATOR_BYTES) {
    throw new LimitExceededError(`The VHDX parent locator of '${path}' is ${locator.length} bytes, above ${MAX_LOCATOR_BYTES}`, { structure: 'VHDX parent locator', limit: MAX_LOCATOR_BYTES, actual: locator.length });
  }
  const bytes = meta.subarray(locator.offset, locator.offset + locator.length);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const count = view.getUint16(18, true);
  const pairs = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    const entry = 20 + i * 12;
    if (entry + 12 > bytes.length) throw new CorruptImageError(`The VHDX parent locator of '${path}' ends inside its entries`, { structure: 'VHDX parent locator' });
    const keyOffset = view.getUint32(entry, true);
    const valueOffset = view.getUint32(entry + 4, true);
    const keyLength = view.getUint16(entry + 8, true);
    const valueLength = view.getUint16(entry + 10, true);
    if (keyOffset + keyLength > bytes.length || valueOffset + valueLength > bytes.length) {
      throw new CorruptImageError(`A VHDX parent locator entry of '${path}' lies outside the locator`, { structure: 'VHDX parent locator' });
    }
    const text = (at: number, length: number) => Buffer.from(bytes.subarray(at, at + length)).toString('utf16le');
    pairs.set(text(keyOffset, keyLength), text(valueOffset, valueLength));
  }
  if (explicit) return { path: undefined, linkage: pairs.get('parent_linkage') };
  const policy = context.options.allowUnsafePaths === undefined ? {} : { allowUnsafePaths: context.options.allowUnsafePaths };
  const candidates = [pairs.get('relative_path'), pairs.get('absolute_win32_path')?.replace(/^\\\\\?\\/, '').replace(/^[A-Za-z]:/, '')]
    .filter((name): name is string => name !== undefined && name !== '')
    .map((name) => name.replace(/\\/g, '/').replace(/^\.\//, ''));
  if (candidates.length === 0) throw missing();
  let firstError: unknown;
  for (const name of candidates) {
    try {
      return { path: await resolveStoredName(path, name, 'parent disk', policy), linkage: pairs.get('parent_linkage') };
    } catch (err) {
      firstError ??= err;
    }
  }
  throw firstError;
}
