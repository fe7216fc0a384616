/**
 * The VHD reader (qemu's `vpc`): fixed, dynamic and differencing disks, after the Virtual Hard
 * Disk Image Format Specification (Microsoft, 2006) and qemu's block/vpc.c.
 *
 * - Every VHD ends in a 512-byte **footer** (big-endian): cookie `conectix`, disk type (2 fixed,
 *   3 dynamic, 4 differencing), the size, CHS geometry and a checksum. A dynamic or
 *   differencing disk also has a copy of it at offset 0.
 * - **Fixed**: the guest disk is the file's bytes before the footer.
 * - **Dynamic**: a 1024-byte dynamic header (`cxsparse`) at the footer's data offset gives the
 *   block size and the block allocation table (BAT): one big-endian u32 per block, the sector
 *   where the block's sector bitmap starts (0xFFFFFFFF: not allocated), its data right after.
 *   Like qemu, the bitmap is not consulted (qemu's writer sets it all-ones): an allocated block
 *   reads as its stored bytes, an unallocated one as zeros.
 * - **Differencing**: the same, plus a parent: a sector whose bitmap bit is clear, and every
 *   unallocated block, reads from the parent VHD, found through the parent locators (a relative
 *   or absolute Windows path, UTF-16LE, or a Mac file URL) and checked by its UUID. The stored
 *   name goes through the path policy like a qcow2 backing name.
 *
 * The virtual size follows qemu: the CHS geometry times 512 unless the creator is one of those
 * that use the footer's current size (Hyper-V `win `, `qem2`, `d2v `, `CTXS`, `tap\0`) or the
 * geometry is the maximum one. Every size and offset is checked against the file before use.
 */

import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { CorruptImageError, InvalidArgumentError, LimitExceededError, UnsupportedFeatureError } from '../errors.js';
import { readExactly, type ReadHandle } from '../io/files.js';
import { resolveStoredName } from '../io/path-policy.js';
import { LruCache } from './cache.js';
import { BaseImage, ByteSource, openSeekable, plain, throughBacking, type OpenContext, type Segment } from './base-image.js';
import type { DiskImage } from './image.js';
import { isVhdFooter } from './probe.js';
import type { CheckableImage, StructureCheck } from './structure-check.js';

const SECTOR = 512;
const DISK_FIXED = 2;
const DISK_DIFFERENCING = 4;
const BAT_UNUSED = 0xffffffff;
/** The largest BAT read (qemu's limit is about the same: 2^24 entries for 2 MiB blocks). */
export const MAX_VHD_BAT_BYTES = 64 * 1024 * 1024;
/** The largest block size accepted (qemu needs a power of two of at least 512; 2 MiB is usual). */
export const MAX_VHD_BLOCK_SIZE = 256 * 1024 * 1024;
/** qemu's VHD_MAX_GEOMETRY: with it the current size is used, not the geometry. */
const MAX_GEOMETRY_SECTORS = 65535 * 16 * 255;
/** qemu's VHD_MAX_SECTORS: the largest disk a VHD can describe (about 2 TiB). */
const MAX_VHD_SECTORS = 0xff000000;
/** Most parent locator bytes read (a path). */
const MAX_LOCATOR_BYTES = 64 * 1024;
/** Creators whose size is the footer's current size, not the geometry (qemu's table). */
const CURRENT_SIZE_CREATORS = new Set(['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0']);

/** The fields of a VHD footer the reader uses. */
export interface VhdFooter {
  diskType: number;
  dataOffset: number;
  currentSize: number;
  geometrySectors: number;
  creatorApp: string;
  uuid: string;
}

function u64(view: DataView, at: number): number {
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (hi === 0xffffffff && lo === 0xffffffff) return -1;
  return hi * 0x1_0000_0000 + lo;
}

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString('hex');
}

/** Decodes a footer (already checked by isVhdFooter: cookie, checksum, disk type). */
export function decodeVhdFooter(sector: Uint8Array): VhdFooter {
  const view = new DataView(sector.buffer, sector.byteOffset, SECTOR);
  return {
    diskType: view.getUint32(60),
    dataOffset: u64(view, 16),
    currentSize: u64(view, 48),
    geometrySectors: view.getUint16(56) * view.getUint8(58) * view.getUint8(59),
    creatorApp: String.fromCharCode(...sector.subarray(28, 32)),
    uuid: hex(sector.subarray(68, 84)),
  };
}

/** The guest size qemu gives a VHD with this footer. */
export function vhdVirtualSize(footer: VhdFooter): number {
  const useGeometry = !CURRENT_SIZE_CREATORS.has(footer.creatorApp) && footer.geometrySectors !== MAX_GEOMETRY_SECTORS;
  return useGeometry ? footer.geometrySectors * SECTOR : footer.currentSize;
}

/** The fields of the dynamic header (`cxsparse`) the reader uses. */
interface DynamicHeader {
  tableOffset: number;
  maxTableEntries: number;
  blockSize: number;
  parentUuid: string;
  parentName: string;
  locators: Array<{ code: string; dataLength: number; dataOffset: number }>;
}

function decodeDynamicHeader(bytes: Uint8Array, path: string, at: number): DynamicHeader {
  const view = new DataView(bytes.buffer, bytes.byteOffset, 1024);
  const corrupt = (message: string, field: string) => new CorruptImageError(`${message} (in '${path}')`, { structure: 'VHD dynamic header', field, offset: at });
  if (String.fromCharCode(...bytes.subarray(0, 8)) !== 'cxsparse') throw corrupt('The dynamic header does not start with "cxsparse"', 'cookie');
  let sum = 0;
  for (let i = 0; i < 1024; i++) if (i < 36 || i >= 40) sum += bytes[i]!;
  if ((~sum >>> 0) !== view.getUint32(36)) throw corrupt('The dynamic header checksum does not match', 'checksum');
  const nameBytes = bytes.subarray(64, 576);
  let nameEnd = 0;
  while (nameEnd + 1 < nameBytes.length && (nameBytes[nameEnd] !== 0 || nameBytes[nameEnd + 1] !== 0)) nameEnd += 2;
  const locators = [];
  for (let i = 0; i < 8; i++) {
    const entry = 576 + i * 24;
    const code = String.fromCharCode(...bytes.subarray(entry, entry + 4));
    if (view.getUint32(entry) === 0) continue;
    locators.push({ code, dataLength: view.getUint32(entry + 8), dataOffset: u64(view, entry + 16) });
  }
  return {
    tableOffset: u64(view, 16),
    maxTableEntries: view.getUint32(28),
    blockSize: view.getUint32(32),
    parentUuid: hex(bytes.subarray(40, 56)),
    parentName: Buffer.from(nameBytes.subarray(0, nameEnd)).swap16().toString('utf16le'),
    locators,
  };
}

/** Where a dynamic VHD's structures lie (bytes), for `check`. */
interface VhdLayout {
  dynamicHeaderOffset: number;
  tableOffset: number;
  tableBytes: number;
}

/** A VHD opened for reading. */
class VhdImage extends BaseImage implements CheckableImage {
  readonly format = 'vpc' as const;
  readonly header = undefined;
  readonly dataFilePath = undefined;
  readonly clusterSize: number;
  private readonly bitmaps: LruCache<Uint8Array>;
  private readonly bitmapBytes: number;

  constructor(
    path: string,
    warnings: string[],
    readonly virtualSize: number,
    private readonly file: ByteSource,
    readonly diskType: number,
    /** Dynamic and differencing: the block size and the BAT. */
    private readonly blockSize: number,
    private readonly bat: DataView | undefined,
    readonly backing: BaseImage | undefined,
    /** The footer's UUID, which a differencing child records as its parent's. */
    readonly uuid: string,
    private readonly layout: VhdLayout | undefined = undefined,
  ) {
    super(path, warnings);
    this.clusterSize = bat ? blockSize : 64 * 1024;
    const sectors = blockSize / SECTOR;
    this.bitmapBytes = Math.ceil(Math.ceil(sectors / 8) / SECTOR) * SECTOR;
    this.bitmaps = new LruCache(64);
  }

  async *segments(start: number, end: number): AsyncGenerator<Segment> {
    yield* throughBacking(this.ownSegments(start, end), this.backing);
  }

  private async *ownSegments(start: number, end: number): AsyncGenerator<Segment> {
    if (!this.bat) {
      yield { start, length: end - start, kind: 'data', depth: 0, source: this.file, hostOffset: start, compressed: undefined };
      return;
    }
    const bs = this.blockSize;
    for (let pos = start; pos < end; ) {
      const block = Math.floor(pos / bs);
      const blockEnd = Math.min(end, (block + 1) * bs);
      const sector = this.bat.getUint32(block * 4);
      if (sector === BAT_UNUSED) {
        // A run of unallocated blocks in one step.
        let runEnd = blockEnd;
        for (let next = block + 1; runEnd < end && this.bat.getUint32(next * 4) === BAT_UNUSED; next++) runEnd = Math.min(end, (next + 1) * bs);
        yield plain(pos, runEnd - pos, 'unallocated');
        pos = runEnd;
        continue;
      }
      const bitmapOffset = sector * SECTOR;
      if (bitmapOffset + this.bitmapBytes > this.file.size) {
        throw new CorruptImageError(`BAT entry ${block} points at sector ${sector}, past the end of '${this.path}' (${this.file.size} bytes)`, {
          structure: 'VHD BAT',
          offset: 0,
        });
      }
      const dataOffset = bitmapOffset + this.bitmapBytes;
      const blockStart = block * bs;
      if (this.diskType !== DISK_DIFFERENCING) {
        yield { start: pos, length: blockEnd - pos, kind: 'data', depth: 0, source: this.file, hostOffset: dataOffset + (pos - blockStart), compressed: undefined };
        pos = blockEnd;
        continue;
      }
      // Differencing: the bitmap says which sectors this disk holds; the others are the parent's.
      const bitmap = await this.bitmap(bitmapOffset);
      while (pos < blockEnd) {
        const s = Math.floor((pos - blockStart) / SECTOR);
        const present = ((bitmap[s >> 3]! >> (7 - (s & 7))) & 1) === 1;
        let runEnd = Math.min(blockEnd, blockStart + (s + 1) * SECTOR);
        for (let n = s + 1; runEnd < blockEnd; n++) {
          if ((((bitmap[n >> 3]! >> (7 - (n & 7))) & 1) === 1) !== present) break;
          runEnd = Math.min(blockEnd, blockStart + (n + 1) * SECTOR);
        }
        if (present) yield { start: pos, length: runEnd - pos, kind: 'data', depth: 0, source: this.file, hostOffset: dataOffset + (pos - blockStart), compressed: undefined };
        else yield plain(pos, runEnd - pos, 'unallocated');
        pos = runEnd;
      }
    }
  }

  /**
   * `check` of a dynamic or differencing VHD (qemu has none for vpc): every allocated block
   * (its sector bitmap and data) lies inside the file and shares no byte with another block, the
   * footers, the dynamic header or the BAT. A fixed VHD has nothing beyond its footer: false.
   */
  async checkStructures(check: StructureCheck): Promise<boolean> {
    if (!this.bat || !this.layout) return false;
    const { dynamicHeaderOffset, tableOffset, tableBytes } = this.layout;
    const space = check.space(this.path, this.file.size);
    space.claim(space.group('footer copy', SECTOR), 0, () => 'the footer copy');
    space.claim(space.group('dynamic header', 1024), dynamicHeaderOffset, () => 'the dynamic header');
    space.claim(space.group('BAT', tableBytes), tableOffset, () => 'the BAT');
    if (this.file.size >= SECTOR) space.claim(space.group('footer', SECTOR), this.file.size - SECTOR, () => 'the footer');
    const blockBytes = this.bitmapBytes + this.blockSize;
    const blockGroup = space.group('block', blockBytes);
    const blocks = Math.ceil(this.virtualSize / this.blockSize);
    check.result.totalClusters = blocks;
    check.result.imageEndOffset = this.file.size;
    for (let block = 0; block < blocks; block++) {
      const sector = this.bat.getUint32(block * 4);
      if (sector === BAT_UNUSED) continue;
      const kept = space.claim(blockGroup, sector * SECTOR, () => `block ${block} (BAT entry: sector ${sector})`);
      if (kept) check.allocated(sector * SECTOR, blockBytes);
    }
    return true;
  }

  private async bitmap(offset: number): Promise<Uint8Array> {
    const cached = this.bitmaps.get(offset);
    if (cached) return cached;
    const bytes = await readExactly(this.file.handle, this.bitmapBytes, offset, this.path, 'VHD sector bitmap');
    this.bitmaps.set(offset, bytes);
    return bytes;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.file.handle.close().catch(() => {});
    await this.backing?.close();
  }
}

/**
 * Opens a VHD (fixed, dynamic or differencing) at `path`. A differencing disk's parent is
 * `explicitParent` when given (the caller chose it), else the name its locators store, through
 * the path policy.
 */
export async function openVhd(path: string, context: OpenContext, depth = 0, explicitParent?: string): Promise<DiskImage> {
  const maxDepth = context.options.maxChainDepth ?? 16;
  if (depth > maxDepth) {
    throw new LimitExceededError(`The VHD parent chain is deeper than ${maxDepth} images (at '${path}')`, { structure: 'backing chain', limit: maxDepth, actual: depth });
  }
  const file = await openSeekable(path, 'image', context.storedNames.get(path));
  let parent: BaseImage | undefined;
  try {
    const source = new ByteSource(file.handle, path, file.size, 'image file', context.warn);
    const corrupt = (message: string, structure: string, offset?: number) =>
      new CorruptImageError(`${message} (in '${path}')`, { structure, ...(offset === undefined ? {} : { offset }) });
    if (file.size < SECTOR) throw corrupt(`The file is ${file.size} bytes, too short for a VHD footer`, 'VHD footer');
    const tail = await readExactly(file.handle, SECTOR, file.size - SECTOR, path, 'VHD footer');
    let footerBytes = tail;
    if (!isVhdFooter(tail)) {
      // A dynamic disk whose trailing footer is damaged still has its copy at offset 0 (qemu
      // reads that copy first).
      const head = await readExactly(file.handle, SECTOR, 0, path, 'VHD footer copy');
      if (!isVhdFooter(head)) throw corrupt('Neither the last sector nor the first is a valid VHD footer (cookie "conectix", checksum, disk type)', 'VHD footer', file.size - SECTOR);
      footerBytes = head;
      context.warn(`The footer at the end of '${path}' is damaged; using its copy at offset 0`);
    }
    const footer = decodeVhdFooter(footerBytes);
    const virtualSize = vhdVirtualSize(footer);
    if (virtualSize <= 0 || virtualSize % SECTOR !== 0 || virtualSize / SECTOR > MAX_VHD_SECTORS || !Number.isSafeInteger(virtualSize)) {
      throw corrupt(`The disk size ${footer.currentSize} (geometry: ${footer.geometrySectors} sectors) is not a valid VHD size`, 'VHD footer', file.size - SECTOR + 48);
    }
    if (footer.diskType === DISK_FIXED) {
      if (virtualSize > file.size - SECTOR) {
        throw corrupt(`A fixed VHD of ${virtualSize} bytes needs ${virtualSize + SECTOR} bytes of file, but the file has ${file.size}`, 'VHD footer', file.size - SECTOR + 48);
      }
      return new VhdImage(path, context.warnings, virtualSize, source, footer.diskType, SECTOR, undefined, undefined, footer.uuid);
    }

    if (footer.dataOffset < 0 || footer.dataOffset + 1024 > file.size) {
      throw corrupt(`The dynamic header offset ${footer.dataOffset} lies outside the file (${file.size} bytes)`, 'VHD footer', file.size - SECTOR + 16);
    }
    const dyn = decodeDynamicHeader(await readExactly(file.handle, 1024, footer.dataOffset, path, 'VHD dynamic header'), path, footer.dataOffset);
    const bs = dyn.blockSize;
    if (bs < SECTOR || bs > MAX_VHD_BLOCK_SIZE || (bs & (bs - 1)) !== 0) {
      throw corrupt(`The block size ${bs} is not a power of two from 512 bytes to ${MAX_VHD_BLOCK_SIZE}`, 'VHD dynamic header', footer.dataOffset + 32);
    }
    const batBytes = dyn.maxTableEntries * 4;
    if (batBytes > MAX_VHD_BAT_BYTES) {
      throw new LimitExceededError(`The VHD block table has ${dyn.maxTableEntries} entries (${batBytes} bytes), above the ${MAX_VHD_BAT_BYTES}-byte limit`, {
        structure: 'VHD dynamic header',
        field: 'max_table_entries',
        limit: MAX_VHD_BAT_BYTES,
        actual: batBytes,
      });
    }
    if (dyn.maxTableEntries * bs < virtualSize) {
      throw corrupt(`The block table (${dyn.maxTableEntries} blocks of ${bs} bytes) is too small for a ${virtualSize}-byte disk`, 'VHD dynamic header', footer.dataOffset + 28);
    }
    if (dyn.tableOffset < 0 || dyn.tableOffset % SECTOR !== 0 || dyn.tableOffset + batBytes > file.size) {
      throw corrupt(`The block table offset ${dyn.tableOffset} is not a sector inside the file`, 'VHD dynamic header', footer.dataOffset + 16);
    }
    const needed = Math.ceil(virtualSize / bs) * 4;
    const batRaw = await readExactly(file.handle, needed, dyn.tableOffset, path, 'VHD block table');
    const bat = new DataView(batRaw.buffer, batRaw.byteOffset, batRaw.byteLength);

    if (footer.diskType === DISK_DIFFERENCING && !context.options.withoutParents) {
      const parentPath = explicitParent ?? (await parentName(path, file.handle, file.size, dyn, context));
      if (explicitParent === undefined) context.storedNames.set(parentPath, 'parent disk');
      const chain = [...context.chain, await realpath(path).catch(() => resolve(path))];
      if (chain.includes(await realpath(parentPath).catch(() => resolve(parentPath)))) {
        throw corrupt(`The VHD parent chain loops: '${parentPath}' is this disk or one above it`, 'VHD parent locator');
      }
      parent = (await openVhd(parentPath, { ...context, chain }, depth + 1)) as BaseImage;
      const parentUuid = (parent as VhdImage).uuid;
      if (parentUuid !== dyn.parentUuid) {
        throw corrupt(`The parent '${parentPath}' has UUID ${parentUuid}, but the disk was made over ${dyn.parentUuid} (the parent changed or is the wrong file)`, 'VHD dynamic header', footer.dataOffset + 40);
      }
    } else if (explicitParent !== undefined) {
      throw new InvalidArgumentError(`A backing image was given, but '${path}' is not a differencing VHD`);
    }
    return new VhdImage(path, context.warnings, virtualSize, source, footer.diskType, bs, bat, parent, footer.uuid, { dynamicHeaderOffset: footer.dataOffset, tableOffset: dyn.tableOffset, tableBytes: batBytes });
  } catch (err) {
    await parent?.close();
    await file.handle.close().catch(() => {});
    throw err;
  }
}

/**
 * The parent's path from the locators: the relative Windows path (`W2ru`) first, then the
 * absolute one (`W2ku`), then a Mac file URL (`MacX`), then the bare parent name; each goes
 * through the path policy, and the first that resolves is used.
 */
async function parentName(path: string, handle: ReadHandle, fileSize: number, dyn: DynamicHeader, context: OpenContext): Promise<string> {
  const order = ['W2ru', 'W2ku', 'MacX'];
  const candidates: string[] = [];
  for (const code of order) {
    for (const locator of dyn.locators.filter((l) => l.code === code)) {
      if (locator.dataLength === 0 || locator.dataLength > MAX_LOCATOR_BYTES || locator.dataOffset < 0 || locator.dataOffset + locator.dataLength > fileSize) {
        throw new CorruptImageError(`The ${code} parent locator (${locator.dataLength} bytes at ${locator.dataOffset}) lies outside '${path}' or is too long`, { structure: 'VHD parent locator' });
      }
      const bytes = await readExactly(handle, locator.dataLength, locator.dataOffset, path, 'VHD parent locator');
      let name = code === 'MacX' ? Buffer.from(bytes).toString('utf8').replace(/^file:\/\/(localhost)?/, '') : Buffer.from(bytes).toString('utf16le');
      name = name.replace(/\0+$/, '');
      if (code !== 'MacX') name = name.replace(/\\/g, '/').replace(/^\.\//, '');
      if (code === 'W2ku') name = name.replace(/^[A-Za-z]:/, '');
      candidates.push(name);
    }
  }
  if (dyn.parentName) candidates.push(dyn.parentName);
  if (candidates.length === 0) {
    throw new UnsupportedFeatureError(`'${path}' is a differencing VHD that does not name its parent`, { structure: 'VHD parent locator', hint: 'Pass the parent with --backing PATH (API: backing)' });
  }
  const policy = context.options.allowUnsafePaths === undefined ? {} : { allowUnsafePaths: context.options.allowUnsafePaths };
  let firstError: unknown;
  for (const name of candidates) {
    try {
      return await resolveStoredName(path, name, 'parent disk', policy);
    } catch (err) {
      firstError ??= err;
    }
  }
  throw firstError;
}
