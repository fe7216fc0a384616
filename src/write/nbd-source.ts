/**
 * Blocks from an NBD export: a source for convert() like `readBlocks` for files.
 *
 * Block status plans the reads: `base:allocation` extents that read as zeros become zero runs
 * (never read); with a dirty bitmap (`qemu:dirty-bitmap:NAME`) clean extents become runs marked
 * `sameAsBase` (an overlay leaves them unallocated, so they come from the previous backup) and
 * only dirty ∩ allocated clusters are read. Reads are 2 MiB (one pooled buffer each, split into
 * requests the server's maximum block size allows), several in flight; bytes the server answers
 * as OFFSET_HOLE are not transferred, and clusters wholly inside such a hole become zero Blocks
 * that do not view the buffer.
 *
 * A cluster is read whole when anything in it must be read: a cluster partly dirty and partly
 * clean, or partly data and partly zero, cannot be described by one qcow2 entry otherwise.
 */

import { zeroRun, type Block } from '../block.js';
import { InvalidArgumentError } from '../errors.js';
import { DEFAULT_CLUSTER_BITS } from '../format/index.js';
import { allocIoBuffer, zeroBuffer } from '../io/buffers.js';
import { BASE_ALLOCATION, dirtyBitmapContext, NbdClient, NBD_STATE_DIRTY, NBD_STATE_ZERO, type NbdExtent, type NbdTlsOptions } from '../io/nbd.js';
import { inputSizeMismatch } from './clusterize.js';
import { MAX_ZERO_RUN_BYTES, READ_SIZE, type BufferPool } from './sources.js';

/** What a run of clusters needs: bytes read, a zero run, or nothing (unchanged since the base). */
export type ClusterKind = 'read' | 'zero' | 'clean';

/** Consecutive clusters [index, index + count) of one kind. */
export interface ClusterRun {
  /** The first guest cluster. */
  index: number;
  /** Clusters in the run. */
  count: number;
  /** What they need. */
  kind: ClusterKind;
}

/** Options of {@link nbdBlocks}. */
export interface NbdBlockSourceOptions {
  /** Bytes per cluster (512 B .. 2 MiB). Default 65536. */
  clusterSize?: number;
  /** Recycle read buffers (READ_SIZE bytes each) through this pool; see BlockSourceOptions.pool. */
  pool?: BufferPool;
  /**
   * The dirty-bitmap meta context (negotiated on the client): only dirty clusters are read,
   * clean ones come as `sameAsBase` runs. Default: a full read.
   */
  dirtyContext?: string;
  /** 2 MiB reads in flight. Default 4. */
  readsInFlight?: number;
}

/**
 * Cuts byte extents (in order, contiguous from 0) into cluster runs. A cluster touched by two
 * kinds is read. Runs of one kind are merged.
 */
export class ClusterSweep {
  private pendingIndex = -1;
  private pendingKind: ClusterKind = 'read';
  private last: ClusterRun | undefined;
  private readonly out: ClusterRun[] = [];
  private readonly clusters: number;

  constructor(
    private readonly size: number,
    private readonly clusterSize: number,
  ) {
    this.clusters = Math.ceil(size / clusterSize);
  }

  /** Adds the extent [start, end) of `kind`; returns the runs completed so far (and forgets them). */
  add(start: number, end: number, kind: ClusterKind): ClusterRun[] {
    const cs = this.clusterSize;
    let pos = start;
    while (pos < end) {
      const c = Math.floor(pos / cs);
      const clusterEnd = Math.min((c + 1) * cs, this.size);
      if (pos === c * cs && end >= clusterEnd) {
        const n = end >= this.size ? this.clusters - c : Math.floor(end / cs) - c;
        this.emit(c, n, kind);
        pos = Math.min((c + n) * cs, this.size);
      } else {
        if (this.pendingIndex === c) this.pendingKind = this.pendingKind === kind ? kind : 'read';
        else {
          this.pendingIndex = c;
          this.pendingKind = kind;
        }
        pos = Math.min(end, clusterEnd);
        if (pos === clusterEnd) this.flushPending();
      }
    }
    return this.out.splice(0);
  }

  /** The runs still held back (call once the extents reached the size). */
  finish(): ClusterRun[] {
    this.flushPending();
    if (this.last) this.out.push(this.last);
    this.last = undefined;
    return this.out.splice(0);
  }

  private flushPending(): void {
    if (this.pendingIndex < 0) return;
    const index = this.pendingIndex;
    this.pendingIndex = -1;
    this.emit(index, 1, this.pendingKind);
  }

  private emit(index: number, count: number, kind: ClusterKind): void {
    const last = this.last;
    if (last && last.kind === kind && last.index + last.count === index) {
      last.count += count;
      return;
    }
    if (last) this.out.push(last);
    this.last = { index, count, kind };
  }
}

/** What an extent means for the copy, from its allocation flags and dirty flags. */
function kindOf(allocation: number | undefined, dirty: number | undefined): ClusterKind {
  if (dirty !== undefined && !(dirty & NBD_STATE_DIRTY)) return 'clean';
  return allocation !== undefined && allocation & NBD_STATE_ZERO ? 'zero' : 'read';
}

/** Options of {@link planClusterRuns}. */
export interface PlanClusterRunsOptions {
  /** Bytes per cluster of the image being written. */
  clusterSize: number;
  /** The dirty-bitmap meta context (`qemu:dirty-bitmap:NAME`) whose clean ranges become `clean` runs. */
  dirtyContext?: string | undefined;
}

/**
 * The cluster runs of the export, from block status (one window ahead). Without the contexts
 * (a server with no structured replies), everything is read.
 */
export async function* planClusterRuns(client: NbdClient, options: PlanClusterRunsOptions): AsyncGenerator<ClusterRun> {
  const { clusterSize, dirtyContext } = options;
  const size = client.size;
  const sweep = new ClusterSweep(size, clusterSize);
  const hasAllocation = client.contexts.has(BASE_ALLOCATION);
  if (dirtyContext !== undefined && !client.contexts.has(dirtyContext)) {
    throw new InvalidArgumentError(`The NBD connection to ${client.address.uri} did not negotiate ${dirtyContext}`);
  }
  if (!hasAllocation && dirtyContext === undefined) {
    if (size > 0) yield* sweep.add(0, size, 'read');
    yield* sweep.finish();
    return;
  }
  const ask = (offset: number) => client.blockStatus(offset, size - offset);
  let offset = 0;
  let next = size > 0 ? ask(0) : undefined;
  while (next) {
    const status = await next;
    const allocation = hasAllocation ? status.get(BASE_ALLOCATION)! : undefined;
    const dirty = dirtyContext === undefined ? undefined : status.get(dirtyContext)!;
    // Each context may answer for a different length: this window ends where the shorter stops.
    const end = Math.min(extentsEnd(allocation, offset), extentsEnd(dirty, offset));
    next = end < size ? ask(end) : undefined;
    next?.catch(() => {});
    let a = 0;
    let d = 0;
    let pos = offset;
    while (pos < end) {
      while (allocation && extentEnd(allocation[a]!) <= pos) a++;
      while (dirty && extentEnd(dirty[d]!) <= pos) d++;
      const stop = Math.min(end, allocation ? extentEnd(allocation[a]!) : end, dirty ? extentEnd(dirty[d]!) : end);
      yield* sweep.add(pos, stop, kindOf(allocation?.[a]!.flags, dirty?.[d]!.flags));
      pos = stop;
    }
    offset = end;
  }
  yield* sweep.finish();
}

const extentEnd = (e: NbdExtent) => e.offset + e.length;
function extentsEnd(extents: NbdExtent[] | undefined, offset: number): number {
  if (!extents) return Infinity;
  const last = extents[extents.length - 1];
  return last ? extentEnd(last) : offset;
}

/** A planned piece: a run cut to what one item of the read-ahead queue holds. */
interface Piece {
  index: number;
  count: number;
  kind: ClusterKind;
  /** Reads: the buffer and the read in flight. */
  buffer?: Buffer;
  length?: number;
  done?: Promise<Array<[number, number]>>;
}

/**
 * Yields the export's Blocks in guest order: zero runs, `sameAsBase` runs (with a dirty
 * context) and data Blocks viewing 2 MiB read buffers. The caller owns the client.
 */
export async function* nbdBlocks(client: NbdClient, options: NbdBlockSourceOptions = {}): AsyncGenerator<Block> {
  const clusterSize = options.clusterSize ?? 2 ** DEFAULT_CLUSTER_BITS;
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > READ_SIZE) {
    throw new InvalidArgumentError(`Invalid cluster size ${clusterSize}: it must be a power of two from 512 bytes to 2 MiB`);
  }
  if (client.blockSize.minimum > clusterSize) {
    throw new InvalidArgumentError(`The NBD server at ${client.address.uri} reads in blocks of at least ${client.blockSize.minimum} bytes, more than the ${clusterSize}-byte clusters`, {
      hint: `Convert with --cluster-size ${client.blockSize.minimum} or more`,
    });
  }
  const { pool } = options;
  if (pool && pool.bufferSize !== READ_SIZE) throw new InvalidArgumentError(`nbdBlocks: the pool's buffers must hold ${READ_SIZE} bytes`);
  const maxReads = Math.max(1, Math.min(options.readsInFlight ?? 4, 16));
  const size = client.size;
  const perRead = READ_SIZE / clusterSize;
  const maxRun = MAX_ZERO_RUN_BYTES / clusterSize;
  const runs = planClusterRuns(client, { clusterSize, dirtyContext: options.dirtyContext });
  const queue: Piece[] = [];
  let readsQueued = 0;
  let planned = false;

  const startRead = (piece: Piece): void => {
    const start = piece.index * clusterSize;
    const length = Math.min(piece.count * clusterSize, size - start);
    const buffer = pool ? pool.acquire() : allocIoBuffer(READ_SIZE);
    piece.buffer = buffer;
    piece.length = length;
    const step = client.maxRead;
    const parts: Array<Promise<Array<[number, number]>>> = [];
    for (let at = 0; at < length; at += step) {
      const n = Math.min(step, length - at);
      parts.push(client.read(start + at, n, buffer, at).then((r) => r.holes.map(([s, e]) => [s + at, e + at] as [number, number])));
    }
    piece.done = Promise.all(parts).then((lists) => lists.flat());
    piece.done.catch(() => {});
    readsQueued++;
  };

  /** Tops the queue up to `maxReads` reads (or the end of the plan). */
  const topUp = async (): Promise<void> => {
    while (!planned && readsQueued < maxReads) {
      const next = await runs.next();
      if (next.done) {
        planned = true;
        return;
      }
      const run = next.value;
      const cut = run.kind === 'read' ? perRead : maxRun;
      for (let i = 0; i < run.count; i += cut) {
        const piece: Piece = { index: run.index + i, count: Math.min(cut, run.count - i), kind: run.kind };
        if (piece.kind === 'read') startRead(piece);
        queue.push(piece);
      }
    }
  };

  try {
    for (;;) {
      await topUp();
      const piece = queue.shift();
      if (!piece) break;
      if (piece.kind !== 'read') {
        const block = zeroRun(piece.index, piece.count, clusterSize);
        if (piece.kind === 'clean') block.sameAsBase = true;
        yield block;
        continue;
      }
      const holes = await piece.done!;
      readsQueued--;
      const buffer = piece.buffer!;
      const length = piece.length!;
      const clusters = Math.ceil(length / clusterSize);
      // Clusters wholly inside a hole need no bytes; partly covered ones get zeros where the hole is.
      let inHole: Uint8Array | undefined;
      for (const [s, e] of holes) {
        const first = Math.ceil(s / clusterSize);
        const last = Math.min(clusters, e >= length ? clusters : Math.floor(e / clusterSize));
        if (last > first) {
          inHole ??= new Uint8Array(clusters);
          inHole.fill(1, first, last);
        }
        const fillEnd = Math.min(e, first * clusterSize);
        if (s < fillEnd) buffer.fill(0, s, fillEnd);
        const tailStart = Math.max(s, last * clusterSize);
        if (last >= first && tailStart < e) buffer.fill(0, tailStart, e);
      }
      const viewed = inHole ? clusters - inHole.reduce((n, v) => n + v, 0) : clusters;
      pool?.lease(buffer, viewed);
      for (let c = 0; c < clusters; c++) {
        const off = c * clusterSize;
        const end = Math.min(length, off + clusterSize);
        if (inHole?.[c]) yield { index: piece.index + c, data: zeroBuffer(end - off), zero: true };
        else yield { index: piece.index + c, data: buffer.subarray(off, end) };
      }
    }
  } finally {
    // Reads still in flight finish into buffers nobody leased; the client's close settles them.
    await runs.return(undefined).catch(() => {});
  }
}

/** An NBD export opened as convert()'s input. */
export interface NbdInput {
  /** The export's size in bytes. */
  readonly size: number;
  readonly client: NbdClient;
  /** Data bytes the server has sent so far. */
  readonly bytesRead: number;
  /** The Blocks of the export (a full read, or the dirty clusters when a bitmap was asked for). */
  blocks(clusterSize: number, pool?: BufferPool): AsyncGenerator<Block>;
  close(): Promise<void>;
}

/**
 * Connects to `uri` for a conversion: negotiates `base:allocation` and, with `bitmap`, the dirty
 * bitmap's context, which the server must publish (NbdServerError otherwise). A declared `size`
 * must match the export's.
 */
export async function openNbdInput(
  uri: string,
  options: { bitmap?: string; size?: number; nbd?: { tls?: NbdTlsOptions; timeout?: number } },
): Promise<NbdInput> {
  const dirtyContext = options.bitmap === undefined ? undefined : dirtyBitmapContext(options.bitmap);
  if (options.bitmap !== undefined && (options.bitmap === '' || Buffer.byteLength(options.bitmap) > 1023)) {
    throw new InvalidArgumentError(`Invalid bitmap name '${options.bitmap}'`);
  }
  const client = await NbdClient.connect(uri, {
    metaContexts: dirtyContext === undefined ? [BASE_ALLOCATION] : [BASE_ALLOCATION, dirtyContext],
    ...(dirtyContext === undefined ? {} : { requiredContexts: [dirtyContext] }),
    ...(options.nbd?.tls ? { tls: options.nbd.tls } : {}),
    ...(options.nbd?.timeout === undefined ? {} : { timeout: options.nbd.timeout }),
  });
  if (options.size !== undefined && options.size !== client.size) {
    await client.close();
    throw inputSizeMismatch(options.size, client.size);
  }
  return {
    size: client.size,
    client,
    get bytesRead() {
      return client.stats.dataBytes;
    },
    blocks: (clusterSize, pool) => nbdBlocks(client, { clusterSize, ...(pool ? { pool } : {}), ...(dirtyContext === undefined ? {} : { dirtyContext }) }),
    close: () => client.close(),
  };
}
