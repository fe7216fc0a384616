/**
 * Structural check of a qcow2 image: what `qemu-img check` verifies (digest §5.5), plus
 * host offset == guest offset with an external data file, which qemu-img check misses (P5).
 *
 * 1. Every reference (header, L1, L2 tables, refcount table and blocks, snapshot tables, and
 *    — without a data file — data and compressed clusters) is counted per host cluster and
 *    compared with the on-disk refcount: fewer on disk is a corruption, more is a leak.
 * 2. COPIED must equal (refcount == 1) on active L1 entries and on allocated L2 entries (with a
 *    data file the data refcount counts as 1, so COPIED is mandatory).
 * 3. Reserved bits, alignment, tables inside the file, extended-L2 bitmaps, and the data-file
 *    rules (no compressed clusters, no snapshots, host == guest).
 *
 * Counts follow qemu's check_refcounts_l1/l2 rule for rule, so damaged images get qemu's numbers:
 * a misaligned L2 table or data cluster is still counted (over every cluster it touches) and an
 * L2 table is walked where its L1 entry says; a reference ending a cluster or more past the end
 * of the file counts nothing; refcounts behind a misaligned refcount block cannot be read (check
 * errors); refcount blocks are counted last and must end with one reference; fragmentation is
 * counted within each L2 table.
 *
 * Only the image file is read (and, with `repair`, written: wrong COPIED flags only); the data
 * file and backing files are never opened. Memory is one
 * 16-bit counter per host cluster of the image file, bounded before it is allocated.
 */

import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import {
  decodeL1Entry,
  decodeL2Entry,
  decodeRefcountTableEntry,
  ENTRY_COMPRESSED_HI,
  EXT_BITMAPS,
  getRefcount,
  imageGeometry,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  L2_RESERVED_MASK_HI,
  L2_RESERVED_MASK_LO,
  MAX_L1_BYTES,
  refcountsPerBlock,
  SUBCLUSTERS,
  subclusterType,
  type L2Context,
  type L2Entry,
  type ParsedHeader,
} from '../format/index.js';
import { fileError, InvalidArgumentError, LimitExceededError, UnsupportedFeatureError } from '../errors.js';
import { readFully } from '../io/files.js';
import type { SeekableFile } from './base-image.js';
import { LruCache } from './cache.js';
import { openDisk, openSeekable, probeFormat, readHeader, validateTables, type ImageFormat } from './image.js';
import { cleanCheckResult, isCheckable, StructureCheck } from './structure-check.js';

/**
 * How bad a finding is: `error` (a corruption), `leak` (space wasted, data safe), `warning`, or
 * `repaired` (a corruption that `repair` fixed; not counted in `corruptions`).
 */
export type FindingSeverity = 'error' | 'leak' | 'warning' | 'repaired';

/** One problem found by {@link checkImage}. */
export interface CheckFinding {
  /** `error`: a corruption; `leak`: a cluster with more refcount than references; `warning`: a note. */
  severity: FindingSeverity;
  /** The structure concerned: `refcount`, `L1 entry`, `L2 entry`, `refcount table`, … */
  structure: string;
  /** Byte offset in the image file, when one applies. */
  offset?: number;
  /** What is wrong, worded like qemu-img check. */
  message: string;
  /** A stable name for findings a program may act on: `copied-flag` (COPIED disagrees with the refcount). */
  kind?: 'copied-flag';
  /**
   * `check --repair` (option `repair`) can fix it safely: a COPIED flag on a cluster whose
   * refcount is right, as qemu's copy-on-write leaves in deduplicated images.
   */
  repairable?: boolean;
}

/** What {@link checkImage} found, with qemu-img check's counts. */
export interface CheckResult {
  /** The path as given. */
  filename: string;
  /**
   * The format checked: `qcow2`, or `vmdk`, `vhdx`, `vpc` (their allocation tables: see
   * src/read/structure-check.ts; clusters are then grains or blocks).
   */
  format: ImageFormat;
  /** No corruptions and no leaks. */
  clean: boolean;
  /** Findings of severity `error`; any makes the exit code 1. */
  corruptions: number;
  /** Clusters with a refcount but no reference (findings of severity `leak`). */
  leaks: number;
  /** Errors that stopped part of the check (unreadable structures). */
  checkErrors: number;
  /** Guest clusters of the virtual size. */
  totalClusters: number;
  /** Guest clusters with host storage (normal, preallocated zero, compressed). */
  allocatedClusters: number;
  /** Allocated clusters whose host offset does not follow the previous allocated cluster's (qemu's measure). */
  fragmentedClusters: number;
  /** Compressed clusters. */
  compressedClusters: number;
  /** End of the last cluster in use in the image file. */
  imageEndOffset: number;
  /** The findings, in the order found; capped at `maxFindings` (counts are not capped). */
  findings: CheckFinding[];
  /** Findings left out of the list once the cap was reached. */
  omittedFindings: number;
  /** Corruptions (counted in `corruptions`) that `repair` would fix: see {@link CheckFinding.repairable}. */
  repairable: number;
  /** Corruptions fixed by `repair` (qemu's `corruptions-fixed`); no longer counted in `corruptions`. */
  repaired: number;
}

/** Options of {@link checkImage}. */
export interface CheckOptions {
  /** Most findings kept in the list (default 1000); the counts include all. */
  maxFindings?: number;
  /**
   * Most L1 entries walked over all snapshots together (default {@link MAX_CHECK_SNAPSHOT_L1_ENTRIES});
   * past it the remaining snapshots are reported as not checked.
   */
  maxSnapshotL1Entries?: number;
  /**
   * Fix the repairable findings (wrong COPIED flags on clusters whose refcount is right) in
   * place: only those 8-byte entries are written, and the file is synced after each table, so
   * an interrupted repair leaves every entry either old or fixed and running it again finishes
   * it. Nothing else is ever written. The image must not be in use (no VM running on it).
   */
  repair?: boolean;
  /** The image's format (default: probed). Raw images and fixed VHDs have nothing to check. */
  format?: ImageFormat;
}

/** One counter per host cluster: 32 Mi clusters × 2 bytes = 64 MiB at most. */
export const MAX_CHECK_CLUSTERS = 32 * 1024 * 1024;
const MAX_REFCOUNT_COUNTER = 0xffff;
const SNAPSHOT_HEADER_SIZE = 40;
const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
/**
 * L1 entries of all snapshot tables walked together at most (2^24, i.e. 128 MiB of L1 tables:
 * a thousand snapshots of a 16 TiB disk with 64 KiB clusters). Up to 65,536 snapshots may each
 * name a 32 MiB L1 table, and nothing stops them from naming the same one, so without a total
 * a small hostile file would make the check loop for hours.
 */
export const MAX_CHECK_SNAPSHOT_L1_ENTRIES = 2 ** 24;

const hex = (n: number | bigint) => `0x${n.toString(16)}`;

/** `entry` with COPIED (bit 63) set or cleared. */
function withCopied(entry: bigint, copied: boolean): bigint {
  return copied ? entry | (1n << 63n) : entry & ~(1n << 63n);
}

/** The host offset of a standard L2 entry when it lies past 2^53 (decodeL2Entry refuses those). */
function farOffset(view: DataView, pos: number): bigint | undefined {
  const offset = view.getBigUint64(pos) & 0x00ff_ffff_ffff_fe00n;
  return offset > BigInt(Number.MAX_SAFE_INTEGER) ? offset : undefined;
}

/**
 * Checks the image at `path`: a qcow2 image's refcounts and tables, or the allocation tables of
 * a VMDK, VHDX or dynamic VHD. Throws only when the image cannot be opened at all, or (typed
 * {@link UnsupportedFeatureError}) when its format has no structure to check: raw, fixed VHD.
 */
export async function checkImage(path: string, options: CheckOptions = {}): Promise<CheckResult> {
  const format = options.format ?? (await probeFormat(path));
  if (format !== 'qcow2') return checkOtherFormat(path, format, options);
  const file = await openSeekable(path, 'image');
  let writer: FileHandle | undefined;
  try {
    const header = await readHeader(file);
    validateTables(header, file.size, path, 'inspect');
    if (options.repair) writer = await openForRepair(file);
    return await new Checker(file, header, options.maxFindings ?? 1000, options.maxSnapshotL1Entries ?? MAX_CHECK_SNAPSHOT_L1_ENTRIES, writer).run();
  } finally {
    await writer?.close().catch(() => {});
    await file.handle.close().catch(() => {});
  }
}

/** qemu-img's words for a format without checks (it exits 63 for raw and vpc). */
const NO_CHECKS = 'This image format does not support checks';

/** VMDK, VHDX and VHD: the reader walks the tables it parses (src/read/structure-check.ts). */
async function checkOtherFormat(path: string, format: ImageFormat, options: CheckOptions): Promise<CheckResult> {
  const noChecks = (why: string) => new UnsupportedFeatureError(`${NO_CHECKS}: '${path}' is ${why}`, { structure: 'check', features: [`check of ${format}`] });
  if (format === 'raw') throw noChecks('a raw image, which has no structure to check');
  if (options.repair) throw new InvalidArgumentError(`Cannot repair '${path}': only qcow2 images are repaired (it is a ${format} image)`);
  // Only this image and the files it is made of are read: never a parent it names.
  const image = await openDisk(path, { format, withoutParents: true });
  try {
    if (!isCheckable(image)) throw noChecks(`a ${format} image without allocation tables`);
    const check = new StructureCheck(path, format, options.maxFindings ?? 1000);
    if (!(await image.checkStructures(check))) throw noChecks('a fixed VHD: its footer, checked when it was opened, is all its structure');
    return check.finish();
  } finally {
    await image.close();
  }
}

/** A read-write handle on the very file being checked (same device and inode), a regular file. */
async function openForRepair(file: SeekableFile): Promise<FileHandle> {
  if (file.kind !== 'file') throw new InvalidArgumentError(`Cannot repair '${file.path}': only a regular file is repaired (it is ${file.kind === 'object' ? 'an object' : `a ${file.kind}`})`);
  let handle: FileHandle;
  try {
    handle = await open(file.path, constants.O_RDWR | constants.O_NOFOLLOW);
  } catch (err) {
    throw fileError(err, 'open for repair', file.path);
  }
  try {
    const [a, b] = await Promise.all([file.handle.stat(), handle.stat()]);
    if (a.dev !== b.dev || a.ino !== b.ino) throw new InvalidArgumentError(`Cannot repair '${file.path}': the file was replaced while it was checked`);
    return handle;
  } catch (err) {
    await handle.close().catch(() => {});
    throw fileError(err, 'inspect', file.path);
  }
}

class Checker {
  private readonly cs: number;
  private readonly hostClusters: number;
  /**
   * Counted references per host cluster. One slot more than the file has clusters: qemu lets a
   * structure run less than one cluster past the end of the file (the last cluster may be
   * partly written) and counts the cluster it reaches there.
   */
  private readonly references: Uint16Array;
  /** Clusters compared with their on-disk refcounts: the file's, or one more when a reference reached past it. */
  private countedClusters: number;
  private readonly hasDataFile: boolean;
  private readonly l2Context: L2Context;
  private readonly refblocks = new LruCache<Uint8Array>(16);
  /** Refcount block offset per refcount table entry: 0 none, -1 unaligned (its refcounts cannot be read, as in qemu). */
  private refblockOffsets: number[] = [];
  /** Refcount table entries with reserved bits set: their blocks are read but not counted, as in qemu. */
  private readonly uncountedRefblocks = new Set<number>();
  private readonly result: CheckResult;
  private suppressLeaks = false;
  /**
   * Snapshot L2 tables by offset, with how many L1 entries point at them. Snapshots share most
   * of their L2 tables, so each table is walked once with its multiplicity, not once per
   * reference: the walk then costs at most the file's size in entries whatever the snapshots say.
   */
  private readonly snapshotL2Visits = new Map<number, { l1Index: number; visits: number }>();
  private snapshotL1Entries = 0;

  constructor(
    private readonly file: SeekableFile,
    private readonly header: ParsedHeader,
    private readonly maxFindings: number,
    private readonly maxSnapshotL1Entries: number,
    /** Set for `repair`: the read-write handle repairs are written through. */
    private readonly writer: FileHandle | undefined = undefined,
  ) {
    this.cs = header.clusterSize;
    this.hostClusters = Math.ceil(file.size / this.cs);
    if (this.hostClusters > MAX_CHECK_CLUSTERS) {
      throw new LimitExceededError(
        `The image file has ${this.hostClusters} clusters; checking more than ${MAX_CHECK_CLUSTERS} would need too much memory`,
        { structure: 'image file', limit: MAX_CHECK_CLUSTERS, actual: this.hostClusters },
      );
    }
    this.references = new Uint16Array(this.hostClusters + 1);
    this.countedClusters = this.hostClusters;
    this.hasDataFile = (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.l2Context = { clusterBits: header.clusterBits, dataFile: this.hasDataFile, extendedL2 };
    this.result = cleanCheckResult(file.path, 'qcow2', imageGeometry(header.size, header.clusterBits, extendedL2).clusters);
  }

  async run(): Promise<CheckResult> {
    const h = this.header;
    this.reference(0, this.cs, 'header');
    if (h.extensions.some((e) => e.type === EXT_BITMAPS)) {
      this.suppressLeaks = true;
      this.report('warning', 'bitmaps', undefined, 'The image has persistent bitmaps; their clusters are not verified, so leaks are not reported');
    }
    await this.checkRefcountTable();
    await this.checkL1(h.l1TableOffset, h.l1Size, true, 'active L1 table');
    await this.checkSnapshots();
    // Refcount blocks last, as qemu counts them: a block must then have exactly one reference.
    this.checkRefcountBlocks();
    await this.compareRefcounts();
    await this.checkCopiedFlags();
    const r = this.result;
    r.clean = r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0;
    return r;
  }

  // --- findings -------------------------------------------------------------------------------

  private report(severity: FindingSeverity, structure: string, offset: number | undefined, message: string, extra: Pick<CheckFinding, 'kind' | 'repairable'> = {}): void {
    if (severity === 'error') this.result.corruptions++;
    else if (severity === 'leak') this.result.leaks++;
    if (this.result.findings.length >= this.maxFindings) {
      this.result.omittedFindings++;
      return;
    }
    const finding: CheckFinding = { severity, structure, message, ...extra };
    if (offset !== undefined) finding.offset = offset;
    this.result.findings.push(finding);
  }

  private checkError(structure: string, offset: number | undefined, message: string): void {
    this.result.checkErrors++;
    this.report('warning', structure, offset, message);
  }

  /**
   * Counts one reference for every cluster that [offset, offset+length) touches, by qemu's rule
   * (qcow2_inc_refcounts_imrt): a range ending one cluster or more past the end of the file is a
   * corruption and counts nothing; one ending less than a cluster past it counts every cluster.
   */
  private reference(offset: number, length: number, what: string, count = 1): void {
    if (length <= 0) return;
    if (offset + length - this.file.size >= this.cs) {
      this.report('error', what, offset, `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset ${hex(offset)} size ${hex(length)} (${what})`);
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + length - 1) / this.cs);
    this.countedClusters = Math.max(this.countedClusters, last + 1);
    for (let c = first; c <= last; c++) {
      this.references[c] = Math.min(MAX_REFCOUNT_COUNTER, (this.references[c] ?? 0) + count);
    }
  }

  /**
   * Reads `length` bytes at `offset`; with `zeroFill` the part past the end of the file reads as
   * zeros (as qemu's file driver does for an L2 table there), otherwise it is a check error.
   */
  private async readBytes(offset: number, length: number, what: string, zeroFill = false): Promise<Uint8Array | undefined> {
    const out = new Uint8Array(length);
    const got = offset < this.file.size ? await readFully(this.file.handle, out, 0, length, offset, this.file.path) : 0;
    if (got < length && !zeroFill) {
      this.checkError(what, offset, `ERROR: cannot read the ${what} at ${hex(offset)}: the file ends at ${this.file.size}`);
      return undefined;
    }
    return out;
  }

  // --- refcount structures --------------------------------------------------------------------

  private async checkRefcountTable(): Promise<void> {
    const h = this.header;
    const length = h.refcountTableClusters * this.cs;
    this.reference(h.refcountTableOffset, length, 'refcount table');
    const table = await this.readBytes(h.refcountTableOffset, length, 'refcount table');
    if (!table) return;
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const offsets: number[] = [];
    for (let i = 0; i < length / 8; i++) {
      const at = h.refcountTableOffset + i * 8;
      let entry;
      try {
        entry = decodeRefcountTableEntry(view, i * 8);
      } catch (err) {
        this.report('error', 'refcount table', at, `ERROR refcount table entry ${i}: ${(err as Error).message}`);
        offsets.push(0);
        continue;
      }
      if (entry.reservedBits) {
        // qemu still reads refcounts through such an entry but does not count its block as used.
        this.report('error', 'refcount table', at, `ERROR refcount table entry ${i} has reserved bits set`);
        this.uncountedRefblocks.add(i);
      }
      const block = entry.blockOffset;
      if (block === 0) {
        offsets.push(0);
        continue;
      }
      if (block % this.cs !== 0) {
        // qemu cannot read the refcounts this block covers: each is a check error, not a corruption.
        this.report('error', 'refcount table', at, `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        offsets.push(-1);
        continue;
      }
      if (block + this.cs > this.file.size) {
        this.report('error', 'refcount table', at, `ERROR refcount block ${i} is outside image`);
        offsets.push(0);
        continue;
      }
      offsets.push(block);
    }
    this.refblockOffsets = offsets;
  }

  /** Counts the refcount blocks, after everything else: each must then be referenced exactly once. */
  private checkRefcountBlocks(): void {
    this.refblockOffsets.forEach((block, i) => {
      if (block <= 0 || this.uncountedRefblocks.has(i)) return;
      this.reference(block, this.cs, 'refcount block');
      const counted = this.references[block / this.cs] ?? 0;
      if (counted !== 1) this.report('error', 'refcount table', this.header.refcountTableOffset + i * 8, `ERROR refcount block ${i} refcount=${counted}`);
    });
  }

  /**
   * The on-disk refcount of host cluster `cluster` (0 where no refcount block covers it), or
   * undefined where its refcount block is not cluster-aligned (qemu's read fails with EIO).
   */
  private async onDiskRefcount(cluster: number): Promise<number | undefined> {
    const perBlock = refcountsPerBlock(this.header.clusterBits, this.header.refcountOrder);
    const index = Math.floor(cluster / perBlock);
    const offset = this.refblockOffsets[index] ?? 0;
    if (offset === -1) return undefined;
    if (offset === 0) return 0;
    let block = this.refblocks.get(offset);
    if (!block) {
      block = await this.readBytes(offset, this.cs, 'refcount block');
      if (!block) return 0;
      this.refblocks.set(offset, block);
    }
    return getRefcount(block, cluster % perBlock, this.header.refcountOrder);
  }

  private async compareRefcounts(): Promise<void> {
    let highest = 0; // qemu's starting value: the end offset is at least one cluster
    for (let c = 0; c < this.countedClusters; c++) {
      const onDisk = await this.onDiskRefcount(c);
      if (onDisk === undefined) {
        this.checkError('refcount', c * this.cs, `Can't get refcount for cluster ${c}: its refcount block is not cluster aligned`);
        continue;
      }
      const counted = this.references[c] ?? 0;
      if (onDisk > 0 || counted > 0) highest = c;
      if (onDisk < counted) {
        this.report('error', 'refcount', c * this.cs, `ERROR cluster ${c} refcount=${onDisk} reference=${counted}`);
      } else if (onDisk > counted && !this.suppressLeaks) {
        this.report('leak', 'refcount', c * this.cs, `Leaked cluster ${c} refcount=${onDisk} reference=${counted}`);
      }
    }
    this.result.imageEndOffset = (highest + 1) * this.cs;
  }

  // --- mapping tables ---------------------------------------------------------------------------

  /** Walks an L1 table and its L2 tables; `active` adds the statistics (COPIED is a pass of its own). */
  private async checkL1(offset: number, entries: number, active: boolean, what: string): Promise<void> {
    if (entries === 0) return;
    const length = entries * 8;
    this.reference(offset, length, what);
    const table = await this.readBytes(offset, length, what);
    if (!table) return;
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    for (let i = 0; i < entries; i++) {
      const at = offset + i * 8;
      let entry;
      try {
        entry = decodeL1Entry(view, i * 8);
      } catch (err) {
        this.report('error', 'L1 entry', at, `ERROR L1 entry ${i}: ${(err as Error).message}`);
        continue;
      }
      if (entry.reservedBits) {
        this.report('error', 'L1 entry', at, `ERROR found L1 entry with reserved bits set: ${hex(view.getBigUint64(i * 8))}`);
      }
      if (entry.l2Offset === 0) continue;
      // As qemu does: the table is counted and walked even where its offset is wrong.
      this.reference(entry.l2Offset, this.cs, 'L2 table');
      if (entry.l2Offset % this.cs !== 0) {
        this.report('error', 'L1 entry', at, `ERROR l2_offset=${hex(entry.l2Offset)}: Table is not cluster aligned; L1 entry corrupted`);
      }
      if (active) await this.checkL2(entry.l2Offset, i, true);
      else {
        const seen = this.snapshotL2Visits.get(entry.l2Offset);
        if (seen) seen.visits++;
        else this.snapshotL2Visits.set(entry.l2Offset, { l1Index: i, visits: 1 });
      }
    }
  }

  /**
   * Walks one L2 table. `visits` > 1 only for snapshot tables referenced several times: their
   * clusters are counted that many times. A snapshot table shared by several L1 indices is
   * judged at the first index (only the data-file host == guest rule depends on it, and a
   * data file with snapshots is reported as a corruption anyway).
   */
  private async checkL2(l2Offset: number, l1Index: number, active: boolean, visits = 1): Promise<void> {
    const table = await this.readBytes(l2Offset, this.cs, 'L2 table', true);
    if (!table) return;
    // Fragmentation is counted within one L2 table, as qemu counts it (check_refcounts_l2).
    let nextContiguous: number | bigint = 0;
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const { l2Entries, l2EntrySize } = imageGeometry(this.header.size, this.header.clusterBits, this.l2Context.extendedL2);
    for (let j = 0; j < l2Entries; j++) {
      const pos = j * l2EntrySize;
      const at = l2Offset + pos;
      const guest = (l1Index * l2Entries + j) * this.cs;
      let entry: L2Entry;
      try {
        entry = decodeL2Entry(view, pos, this.l2Context);
      } catch (err) {
        const far = (view.getUint32(pos) & ENTRY_COMPRESSED_HI) === 0 ? farOffset(view, pos) : undefined;
        if (far === undefined) {
          this.report('error', 'L2 entry', at, `ERROR L2 entry for guest offset ${hex(guest)}: ${(err as Error).message}`);
          continue;
        }
        // A host offset past 2^53 (a hostile or garbage entry): what qemu reports for it. It is
        // necessarily past the end of the file, so it references nothing.
        const raw = view.getBigUint64(pos);
        if ((view.getUint32(pos) & L2_RESERVED_MASK_HI) !== 0 || (view.getUint32(pos + 4) & L2_RESERVED_MASK_LO) !== 0) {
          this.report('error', 'L2 entry', at, `ERROR found L2 entry with reserved bits set: ${hex(raw)}`);
        }
        if (active) {
          this.result.allocatedClusters++;
          if (nextContiguous !== 0 && far !== nextContiguous) this.result.fragmentedClusters++;
          nextContiguous = far + BigInt(this.cs);
        }
        if (far % BigInt(this.cs) !== 0n) this.report('error', 'L2 entry', at, `ERROR offset=${hex(far)}: Data cluster is not properly aligned; L2 entry corrupted`);
        if (!this.hasDataFile) this.reference(Number(far), this.cs, 'data cluster', visits);
        continue;
      }
      const raw = hex(view.getBigUint64(pos));
      this.checkSubclusters(entry, at, l2Offset, j);
      if (entry.type === 'compressed') {
        if (this.hasDataFile) {
          this.report('error', 'L2 entry', at, `ERROR compressed cluster ${guest / this.cs} with data file, entry=${raw}`);
          continue;
        }
        if (entry.copied) this.report('error', 'L2 entry', at, `ERROR: coffset=${hex(entry.hostOffset)}: copied flag must never be set for compressed clusters`);
        this.reference(entry.hostOffset, entry.compressedSize, 'compressed cluster', visits);
        if (active) {
          this.result.allocatedClusters++;
          this.result.compressedClusters++;
          this.result.fragmentedClusters++;
        }
        continue;
      }
      if (entry.reservedBits) this.report('error', 'L2 entry', at, `ERROR found L2 entry with reserved bits set: ${raw}`);
      if ((entry.type === 'zero-plain' || entry.type === 'zero-alloc') && this.header.version < 3) {
        this.report('error', 'L2 entry', at, `ERROR zero cluster entry in a version 2 image: ${raw}`);
      }
      if (entry.type !== 'normal' && entry.type !== 'zero-alloc') continue;
      // qemu's order: statistics and the reference first, then the alignment (a misaligned
      // cluster is still counted, over the clusters it touches).
      if (active) {
        this.result.allocatedClusters++;
        if (nextContiguous !== 0 && entry.hostOffset !== nextContiguous) this.result.fragmentedClusters++;
        nextContiguous = entry.hostOffset + this.cs;
      }
      if (!this.hasDataFile) this.reference(entry.hostOffset, this.cs, 'data cluster', visits);
      const aligned = entry.hostOffset % this.cs === 0;
      if (!aligned) {
        const what = entry.type === 'zero-alloc' ? 'Preallocated cluster' : 'Data cluster';
        this.report('error', 'L2 entry', at, `ERROR offset=${hex(entry.hostOffset)}: ${what} is not properly aligned; L2 entry corrupted`);
      } else if (this.hasDataFile && entry.hostOffset !== guest) {
        // qemu-img check does not look for this; qemu fails the read with EIO (pitfall P5).
        this.report('error', 'L2 entry', at, `ERROR data file host offset ${hex(entry.hostOffset)} does not match guest offset ${hex(guest)}, entry=${raw}`);
      }
    }
  }

  // --- COPIED flags ------------------------------------------------------------------------------

  /**
   * COPIED must equal (refcount == 1) on every active L1 entry and every allocated active L2
   * entry; checked after the refcounts, in a pass of its own, as qemu does (check_oflag_copied).
   *
   * A wrong flag on a cluster whose refcount is itself right (counted references = on-disk
   * refcount, and for an L2 entry, an L2 table referenced once) is repairable: setting the flag
   * to what the refcount says changes nothing else. That is what qemu's copy-on-write leaves in a
   * deduplicated image: the other sharer of a cluster drops to refcount 1 without COPIED. With
   * `repair`, exactly those entries are rewritten (8 bytes each, the file synced after each table).
   */
  private async checkCopiedFlags(): Promise<void> {
    const h = this.header;
    if (h.l1Size === 0) return;
    const l1 = await this.readBytes(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
    if (!l1) return;
    const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    const { l2Entries, l2EntrySize } = imageGeometry(h.size, h.clusterBits, this.l2Context.extendedL2);
    // Dirty (lazy refcounts): the on-disk refcounts may be stale, so no flag is judged repairable.
    const trustRefcounts = (h.incompatibleFeatures & INCOMPAT_DIRTY) === 0n;
    for (let i = 0; i < h.l1Size; i++) {
      let l1Entry;
      try {
        l1Entry = decodeL1Entry(l1View, i * 8);
      } catch {
        continue; // reported by the first pass
      }
      const l2Offset = l1Entry.l2Offset;
      if (l2Offset === 0) continue;
      const l2Cluster = Math.floor(l2Offset / this.cs);
      const l2Refcount = await this.onDiskRefcount(l2Cluster);
      if (l2Refcount === undefined) continue; // qemu skips what it cannot read, silently
      const l2Consistent = trustRefcounts && this.references[l2Cluster] === l2Refcount;
      if ((l2Refcount === 1) !== l1Entry.copied) {
        const at = h.l1TableOffset + i * 8;
        const fix = l2Consistent && l2Offset % this.cs === 0 ? [{ at, value: withCopied(l1View.getBigUint64(i * 8), l2Refcount === 1) }] : [];
        await this.copiedFinding('L1 entry', at, `OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex(l1View.getBigUint64(i * 8))} refcount=${l2Refcount}`, fix);
      }
      const table = await this.readBytes(l2Offset, this.cs, 'L2 table', true);
      if (!table) continue;
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      // Entries of a table referenced more than once (shared with a snapshot) are never rewritten.
      const tableWritable = l2Consistent && l2Refcount === 1 && l2Offset % this.cs === 0;
      const fixes: { at: number; value: bigint; message: string }[] = [];
      for (let j = 0; j < l2Entries; j++) {
        const pos = j * l2EntrySize;
        let entry: L2Entry;
        try {
          entry = decodeL2Entry(view, pos, this.l2Context);
        } catch {
          continue;
        }
        if (entry.type !== 'normal' && entry.type !== 'zero-alloc') continue;
        const cluster = Math.floor(entry.hostOffset / this.cs);
        // With a data file, data clusters are not refcounted and count as refcount 1.
        const refcount = this.hasDataFile ? 1 : await this.onDiskRefcount(cluster);
        if (refcount === undefined || (refcount === 1) === entry.copied) continue;
        const raw = view.getBigUint64(pos);
        const message = `OFLAG_COPIED data cluster: l2_entry=${hex(raw)} refcount=${refcount}`;
        const consistent = this.hasDataFile || (trustRefcounts && entry.hostOffset % this.cs === 0 && this.references[cluster] === refcount);
        if (tableWritable && consistent) fixes.push({ at: l2Offset + pos, value: withCopied(raw, refcount === 1), message });
        else await this.copiedFinding('L2 entry', l2Offset + pos, message, []);
      }
      for (const fix of fixes) await this.copiedFinding('L2 entry', fix.at, fix.message, [fix], false);
      if (fixes.length && this.writer) await this.syncRepairs();
    }
  }

  /** Reports a wrong COPIED flag: repaired when `fix` is non-empty and repair was asked for. */
  private async copiedFinding(structure: string, offset: number, message: string, fix: { at: number; value: bigint }[], sync = true): Promise<void> {
    const repairable = fix.length > 0;
    if (repairable && this.writer) {
      for (const { at, value } of fix) await this.writeEntry(at, value);
      if (sync) await this.syncRepairs();
      this.result.repaired++;
      this.report('repaired', structure, offset, `Repairing ${message}`, { kind: 'copied-flag', repairable: true });
      return;
    }
    if (repairable) this.result.repairable++;
    this.report('error', structure, offset, `ERROR ${message}`, repairable ? { kind: 'copied-flag', repairable: true } : { kind: 'copied-flag' });
  }

  private async writeEntry(at: number, value: bigint): Promise<void> {
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setBigUint64(0, value);
    try {
      const { bytesWritten } = await this.writer!.write(bytes, 0, 8, at);
      if (bytesWritten !== 8) throw Object.assign(new Error('short write'), { code: 'EIO' });
    } catch (err) {
      throw fileError(err, 'repair', this.file.path);
    }
  }

  private async syncRepairs(): Promise<void> {
    try {
      await this.writer!.datasync();
    } catch (err) {
      throw fileError(err, 'sync', this.file.path);
    }
  }

  private checkSubclusters(entry: L2Entry, at: number, l2Offset: number, index: number): void {
    if (!this.l2Context.extendedL2) return;
    for (let sub = 0; sub < SUBCLUSTERS; sub++) {
      if (subclusterType(entry, sub) === 'invalid') {
        this.report('error', 'L2 entry', at, `ERROR invalid cluster entry found (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(index)}): subcluster bitmap ${hex((entry.zeroMask >>> 0) * 2 ** 32 + (entry.allocMask >>> 0))}`);
        return;
      }
    }
  }

  // --- snapshots --------------------------------------------------------------------------------

  private async checkSnapshots(): Promise<void> {
    const h = this.header;
    if (h.nbSnapshots === 0) return;
    if (this.hasDataFile) this.report('error', 'snapshot table', h.snapshotsOffset, `ERROR ${h.nbSnapshots} snapshots in image with data file`);
    await this.walkSnapshotL1Tables();
    for (const [l2Offset, { l1Index, visits }] of this.snapshotL2Visits) await this.checkL2(l2Offset, l1Index, false, visits);
  }

  /** Reads the snapshot table and walks each snapshot's L1 table (its L2 tables are queued). */
  private async walkSnapshotL1Tables(): Promise<void> {
    const h = this.header;
    let pos = h.snapshotsOffset;
    const start = pos;
    for (let i = 0; i < h.nbSnapshots; i++) {
      const fixed = await this.readBytes(pos, SNAPSHOT_HEADER_SIZE, 'snapshot table');
      if (!fixed) return;
      const view = new DataView(fixed.buffer, fixed.byteOffset, fixed.byteLength);
      const l1Offset = view.getUint32(0) * 2 ** 32 + view.getUint32(4);
      const l1Size = view.getUint32(8);
      const idSize = view.getUint16(12);
      const nameSize = view.getUint16(14);
      const extraSize = view.getUint32(36);
      pos += Math.ceil((SNAPSHOT_HEADER_SIZE + extraSize + idSize + nameSize) / 8) * 8;
      if (pos - start > MAX_SNAPSHOT_TABLE_BYTES) {
        this.checkError('snapshot table', start, `ERROR the snapshot table is larger than ${MAX_SNAPSHOT_TABLE_BYTES} bytes`);
        return;
      }
      if (l1Size * 8 > MAX_L1_BYTES || l1Offset % this.cs !== 0 || l1Offset + l1Size * 8 > this.file.size) {
        this.report('error', 'snapshot table', pos, `ERROR snapshot ${i} has an invalid L1 table (offset ${hex(l1Offset)}, ${l1Size} entries)`);
        continue;
      }
      this.snapshotL1Entries += l1Size;
      if (this.snapshotL1Entries > this.maxSnapshotL1Entries) {
        // What is left unwalked holds references, so refcounts above them are not leaks.
        this.suppressLeaks = true;
        this.checkError('snapshot table', start, `ERROR the snapshots' L1 tables hold more than ${this.maxSnapshotL1Entries} entries together; snapshots from ${i} on are not checked`);
        return;
      }
      await this.checkL1(l1Offset, l1Size, false, `L1 table of snapshot ${i}`);
    }
    this.reference(start, pos - start, 'snapshot table');
  }

}
