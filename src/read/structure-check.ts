/**
 * `check` for the formats other than qcow2 (VMDK, VHDX, VHD): each reader walks the allocation
 * tables it already parses (grain directory and tables, BAT, sector bitmaps) and reports here
 * what it finds, in the shape of a qcow2 check ({@link CheckResult}).
 *
 * What counts as a corruption, beyond the format's own rules the reader applies: an entry whose
 * bytes start past the end of their file (qemu's rule for VMDK and VHDX), or end past it, and
 * two structures or allocated units that claim the same bytes of a file (which qemu does not
 * look for: one write through either would change the other).
 *
 * Overlaps are found by sorting every claimed range of a file by its start. A range is one
 * float64: its start times {@link GROUP_SLOTS} plus its group (grain, block, grain table…), a
 * group giving the name and length, so memory is 8 bytes per allocated unit, bounded by
 * {@link MAX_CHECK_RANGES} before it grows.
 * @internal
 */

import { LimitExceededError } from '../errors.js';
import type { CheckFinding, CheckResult, FindingSeverity } from './check.js';
import type { ImageFormat } from './image.js';

/** Most ranges (allocated grains or blocks, tables) a check keeps: 8 bytes each, 64 MiB in all. */
export const MAX_CHECK_RANGES = 8 * 1024 * 1024;
/** Groups per file: the start is multiplied by this, so ranges start below 2^53 / 16 (512 TiB). */
const GROUP_SLOTS = 16;
const MAX_ENCODED_START = Math.floor(Number.MAX_SAFE_INTEGER / GROUP_SLOTS);

const hex = (n: number) => `0x${n.toString(16)}`;

/** An image a `check` can walk: the readers of VMDK, VHDX and VHD implement it. */
export interface CheckableImage {
  /** Walks the image's allocation structures, reporting into `check`; false when it has none (a fixed VHD). */
  checkStructures(check: StructureCheck): Promise<boolean>;
}

export function isCheckable(image: object): image is CheckableImage {
  return typeof (image as Partial<CheckableImage>).checkStructures === 'function';
}

/** The findings and counts of one check of a VMDK, VHDX or VHD image. */
export class StructureCheck {
  readonly result: CheckResult;
  private readonly spaces: HostSpace[] = [];
  private ranges = 0;
  /** Host offset just past the last allocated unit, for the fragmentation count. */
  private lastEnd = -1;

  constructor(
    filename: string,
    format: ImageFormat,
    private readonly maxFindings: number,
  ) {
    this.result = cleanCheckResult(filename, format, 0);
  }

  /** A corruption. */
  error(structure: string, offset: number | undefined, message: string): void {
    this.report('error', structure, offset, message);
  }

  /** A note that is not a corruption (bytes past the end that read as zeros, as qemu has them). */
  warning(structure: string, offset: number | undefined, message: string): void {
    this.report('warning', structure, offset, message);
  }

  private report(severity: FindingSeverity, structure: string, offset: number | undefined, message: string): void {
    if (severity === 'error') this.result.corruptions++;
    if (this.result.findings.length >= this.maxFindings) {
      this.result.omittedFindings++;
      return;
    }
    const finding: CheckFinding = { severity, structure, message };
    if (offset !== undefined) finding.offset = offset;
    this.result.findings.push(finding);
  }

  /** The claimed ranges of one file (the image file, or an extent file of a VMDK). */
  space(file: string, size: number): HostSpace {
    const space = new HostSpace(this, file, size, () => {
      if (++this.ranges > MAX_CHECK_RANGES) {
        throw new LimitExceededError(`Checking '${file}' needs more than ${MAX_CHECK_RANGES} allocated units in memory`, { structure: 'check', limit: MAX_CHECK_RANGES, actual: this.ranges });
      }
    });
    this.spaces.push(space);
    return space;
  }

  /** Counts `clusters` allocated guest units (grains, blocks) stored from `hostOffset` on, in guest order. */
  allocated(hostOffset: number, length: number, compressed = false, clusters = 1): void {
    this.result.allocatedClusters += clusters;
    if (compressed) this.result.compressedClusters += clusters;
    if (this.lastEnd >= 0 && hostOffset !== this.lastEnd) this.result.fragmentedClusters++;
    this.lastEnd = hostOffset + length;
  }

  /** Sorts each file's ranges and reports the overlaps; then the verdict. */
  finish(): CheckResult {
    for (const space of this.spaces) space.reportOverlaps();
    this.spaces.length = 0;
    const r = this.result;
    r.clean = r.corruptions === 0 && r.leaks === 0 && r.checkErrors === 0;
    return r;
  }
}

/** The ranges of one file that structures and allocated units claim. */
export class HostSpace {
  private readonly groups: Array<{ name: string; length: number }> = [];
  private encoded = new Float64Array(256);
  private count = 0;

  constructor(
    private readonly check: StructureCheck,
    readonly file: string,
    readonly size: number,
    private readonly counted: () => void,
  ) {}

  /** A kind of range of one length: `grain`, `grain table`, `BAT`… (the same name and length: the same group). */
  group(name: string, length: number): number {
    const known = this.groups.findIndex((g) => g.name === name && g.length === length);
    if (known >= 0) return known;
    if (this.groups.length >= GROUP_SLOTS) {
      throw new LimitExceededError(`'${this.file}' holds structures of more than ${GROUP_SLOTS} different sizes (${name}); the check keeps to ${GROUP_SLOTS}`, { structure: 'check', limit: GROUP_SLOTS, actual: GROUP_SLOTS + 1 });
    }
    this.groups.push({ name, length });
    return this.groups.length - 1;
  }

  /**
   * Claims [start, start + the group's length) for `what` (`grain table 3`…). A range starting
   * at or past the end of the file is a corruption (`pastEnd` words it, qemu's way where qemu
   * has one) and is not kept; one ending past the end is kept, and is a corruption unless
   * `tolerateTail` (the caller warns instead: those bytes read as zeros). False when not kept.
   */
  claim(group: number, start: number, what: () => string, options: { pastEnd?: () => string; tolerateTail?: boolean } = {}): boolean {
    const { name, length } = this.groups[group]!;
    if (length <= 0) return true;
    if (start >= this.size || start > MAX_ENCODED_START) {
      this.check.error(name, start, options.pastEnd?.() ?? `ERROR: ${what()} starts at byte ${start}, after the end of '${this.file}' (${this.size} bytes)`);
      return false;
    }
    if (start + length > this.size && !options.tolerateTail) {
      this.check.error(name, start, `ERROR: ${what()} ends at byte ${start + length}, after the end of '${this.file}' (${this.size} bytes)`);
    }
    this.counted();
    if (this.count === this.encoded.length) {
      const grown = new Float64Array(this.encoded.length * 2);
      grown.set(this.encoded);
      this.encoded = grown;
    }
    this.encoded[this.count++] = start * GROUP_SLOTS + group;
    return true;
  }

  /** One corruption for each range that starts inside an earlier one. */
  reportOverlaps(): void {
    const sorted = this.encoded.subarray(0, this.count).sort();
    let reachEnd = -1;
    let reach: { name: string; start: number } | undefined;
    for (const value of sorted) {
      const start = Math.floor(value / GROUP_SLOTS);
      const group = this.groups[value - start * GROUP_SLOTS]!;
      if (reach && start < reachEnd) {
        this.check.error(group.name, start, `ERROR: the ${group.name} at ${hex(start)} overlaps the ${reach.name} at ${hex(reach.start)} in '${this.file}'`);
      }
      if (start + group.length > reachEnd) {
        reachEnd = start + group.length;
        reach = { name: group.name, start };
      }
    }
    this.encoded = new Float64Array(0);
    this.count = 0;
  }
}

/** A check's result before anything is found: clean, every count zero. @internal */
export function cleanCheckResult(filename: string, format: ImageFormat, totalClusters: number): CheckResult {
  return {
    filename,
    format,
    clean: true,
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
    totalClusters,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    imageEndOffset: 0,
    findings: [],
    omittedFindings: 0,
    repairable: 0,
    repaired: 0,
  };
}
