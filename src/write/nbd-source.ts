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

import { zeroRun, type Block, type BlockBatch } from '../block.js';
import { InvalidArgumentError } from '../errors.js';
import { DEFAULT_CLUSTER_BITS } from '../format/index.js';
import { allocIoBuffer, zeroBuffer } from '../io/buffers.js';
import { BASE_ALLOCATION, dirtyBitmapContext, NbdClient, NBD_FLAG, NBD_STATE_DIRTY, NBD_STATE_ZERO, type NbdExtent, type NbdTlsOptions } from '../io/nbd.js';
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
  /** 2 MiB read buffers in flight (each holds one read, or several small ones). Default 8. */
  readsInFlight?: number;
  /**
   * The connections reads are spread over (the least loaded takes each request): `client` and
   * its siblings (NbdClient.connectSibling). Looked at for every read, so it may grow while
   * reading. Block status always asks `client`. Default: `client` alone.
   */
  connections?: readonly NbdClient[];
  /**
   * Called once, when the reads asked for pass `SIBLINGS_AFTER` (64 MiB) bytes: the moment to open
   * more connections (they join `connections`). A short job (an incremental) never pays for them.
   */
  wantConnections?: () => void;
}

/** Read bytes after which more connections are worth their handshakes. */
export const SIBLINGS_AFTER = 64 * 1024 * 1024;

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

/** A read of one run's clusters into part of a group's buffer. */
interface ReadPart {
  index: number;
  count: number;
  /** Where in the group's buffer the part starts, and its bytes (the image's last cluster may be short). */
  at: number;
  length: number;
  /** Settles with the holes the server reported, [start, end) relative to the part. */
  done: Promise<Array<[number, number]>>;
}

/**
 * What goes out as one batch: runs in guest order, the reads among them packed into one 2 MiB
 * buffer (so scattered dirty clusters share buffers and requests go out together).
 */
interface Group {
  items: Array<ReadPart | ClusterRun>;
  buffer: Buffer | undefined;
  /** Bytes of the buffer taken. */
  used: number;
}

/**
 * The largest request a read buffer is cut into. qemu-nbd 7.2 spent ~1.1 s of CPU serving a
 * 2 GiB image in 2 MiB reads and ~0.67 s in 512 KiB ones (its profile: page faults and page
 * clearing for each large request buffer); 256 KiB and 1 MiB were close to 512 KiB.
 */
const REQUEST_SIZE = 512 * 1024;
/** Items (parts and runs) per group: a batch of runs stays small however sparse the image. */
const MAX_GROUP_ITEMS = 256;
/** Groups planned ahead of the consumer, reads or not. */
const MAX_GROUPS_AHEAD = 32;
/** 2 MiB read buffers in flight by default. */
export const DEFAULT_NBD_READS_IN_FLIGHT = 8;

/**
 * The export as BlockBatches in guest order: zero runs, `sameAsBase` runs (with a dirty
 * context) and data Blocks viewing 2 MiB read buffers, one batch per buffer; the last batch
 * carries `inputEnd`. The caller owns the client and the connections.
 */
export async function* nbdBatches(client: NbdClient, options: NbdBlockSourceOptions = {}): AsyncGenerator<BlockBatch> {
  const clusterSize = options.clusterSize ?? 2 ** DEFAULT_CLUSTER_BITS;
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > READ_SIZE) {
    throw new InvalidArgumentError(`Invalid cluster size ${clusterSize}: it must be a power of two from 512 bytes to 2 MiB`);
  }
  const connections = options.connections ?? [client];
  for (const c of connections) {
    if (c.blockSize.minimum > clusterSize) {
      throw new InvalidArgumentError(`The NBD server at ${c.address.uri} reads in blocks of at least ${c.blockSize.minimum} bytes, more than the ${clusterSize}-byte clusters`, {
        hint: `Convert with --cluster-size ${c.blockSize.minimum} (API: clusterSize: ${c.blockSize.minimum}) or more`,
      });
    }
    if (c.size !== client.size) throw new InvalidArgumentError(`nbdBlocks: a connection serves ${c.size} bytes, the client ${client.size}`);
  }
  const { pool } = options;
  if (pool && pool.bufferSize !== READ_SIZE) throw new InvalidArgumentError(`nbdBlocks: the pool's buffers must hold ${READ_SIZE} bytes`);
  const maxReads = Math.max(1, Math.min(options.readsInFlight ?? DEFAULT_NBD_READS_IN_FLIGHT, 64));
  const size = client.size;
  const maxRun = MAX_ZERO_RUN_BYTES / clusterSize;
  const runs = planClusterRuns(client, { clusterSize, dirtyContext: options.dirtyContext });
  const queue: Group[] = [];
  let open: Group | undefined;
  /** Groups holding a buffer, queued or open. */
  let buffered = 0;
  let requested = 0;
  let wantConnections = options.wantConnections;
  let planned = false;

  /** The live connection with the fewest read bytes outstanding (the list may have grown). */
  const pick = (): NbdClient => {
    let best = client;
    let load = Infinity;
    for (const c of connections) {
      if (c.error) continue;
      const pending = c.readBytesPending;
      if (pending < load) {
        best = c;
        load = pending;
      }
    }
    return best;
  };

  const close = (): void => {
    if (open) queue.push(open);
    open = undefined;
  };

  /** Starts reading `count` clusters from `index` into the open group's buffer. */
  const addRead = (index: number, count: number): void => {
    open ??= { items: [], buffer: undefined, used: 0 };
    if (!open.buffer) {
      open.buffer = pool ? pool.acquire() : allocIoBuffer(READ_SIZE);
      buffered++;
    }
    const start = index * clusterSize;
    const length = Math.min(count * clusterSize, size - start);
    requested += length;
    if (wantConnections && requested >= SIBLINGS_AFTER) {
      wantConnections();
      wantConnections = undefined;
    }
    const at = open.used;
    const buffer = open.buffer;
    const parts: Array<Promise<Array<[number, number]>>> = [];
    for (let sub = 0; sub < length; ) {
      const reader = pick();
      const n = Math.min(reader.maxRead, REQUEST_SIZE, length - sub);
      const from = sub;
      parts.push(reader.read(start + from, n, buffer, at + from).then((r) => (from === 0 ? r.holes : r.holes.map(([s, e]) => [s + from, e + from] as [number, number]))));
      sub += n;
    }
    const done = parts.length === 1 ? parts[0]! : Promise.all(parts).then((lists) => lists.flat());
    done.catch(() => {});
    open.items.push({ index, count, at, length, done });
    open.used += count * clusterSize;
  };

  /** What is left of the run being planned (a long run is taken a buffer at a time). */
  let rest: ClusterRun | undefined;

  /** Plans ahead until `maxReads` buffers are in use (or the plan ends). */
  const topUp = async (): Promise<void> => {
    while (buffered < maxReads && queue.length < MAX_GROUPS_AHEAD) {
      let run = rest;
      rest = undefined;
      if (!run) {
        if (planned) return;
        const next = await runs.next();
        if (next.done) {
          planned = true;
          return;
        }
        run = next.value;
      }
      let n: number;
      if (run.kind === 'read') {
        n = Math.min(open?.buffer ? (READ_SIZE - open.used) / clusterSize : READ_SIZE / clusterSize, run.count);
        addRead(run.index, n);
      } else {
        n = Math.min(maxRun, run.count);
        open ??= { items: [], buffer: undefined, used: 0 };
        open.items.push({ index: run.index, count: n, kind: run.kind });
      }
      if (open!.used === READ_SIZE || open!.items.length >= MAX_GROUP_ITEMS) close();
      if (n < run.count) rest = { index: run.index + n, count: run.count - n, kind: run.kind };
    }
  };

  try {
    for (;;) {
      await topUp();
      // Nothing closed yet: the open group goes as it is rather than wait to fill.
      if (queue.length === 0) close();
      if (queue.length === 0 && rest) continue;
      const group = queue.shift();
      if (!group) break;
      const blocks: Block[] = [];
      const { buffer } = group;
      let viewed = 0;
      for (const item of group.items) {
        if (!('done' in item)) {
          const block = zeroRun(item.index, item.count, clusterSize);
          if (item.kind === 'clean') block.sameAsBase = true;
          blocks.push(block);
          continue;
        }
        const holes = await item.done;
        const inHole = holes.length > 0 ? zeroHoles(buffer!, item.at, item.length, holes, clusterSize) : undefined;
        const clusters = Math.ceil(item.length / clusterSize);
        for (let c = 0; c < clusters; c++) {
          const off = c * clusterSize;
          const end = Math.min(item.length, off + clusterSize);
          if (inHole?.[c]) {
            blocks.push({ index: item.index + c, data: zeroBuffer(end - off), zero: true });
          } else {
            blocks.push({ index: item.index + c, data: buffer!.subarray(item.at + off, item.at + end) });
            viewed++;
          }
        }
      }
      if (buffer) {
        buffered--;
        pool?.lease(buffer, viewed);
      }
      if (blocks.length > 0) yield { clusterSize, blocks };
    }
    yield { clusterSize, blocks: [], inputEnd: size };
  } finally {
    // Reads still in flight finish into buffers nobody leased; the client's close settles them.
    await runs.return(undefined).catch(() => {});
  }
}

/**
 * Zeroes the bytes of `holes` (relative to the part at `at`, `length` bytes) that share a
 * cluster with data, and returns which of the part's clusters lie wholly in a hole (those need
 * no bytes: they become zero Blocks), or undefined when none does.
 */
function zeroHoles(buffer: Buffer, at: number, length: number, holes: Array<[number, number]>, clusterSize: number): Uint8Array | undefined {
  const clusters = Math.ceil(length / clusterSize);
  let inHole: Uint8Array | undefined;
  for (const [s, e] of holes) {
    const first = Math.ceil(s / clusterSize);
    const last = Math.min(clusters, e >= length ? clusters : Math.floor(e / clusterSize));
    if (last > first) {
      inHole ??= new Uint8Array(clusters);
      inHole.fill(1, first, last);
    }
    const fillEnd = Math.min(e, first * clusterSize);
    if (s < fillEnd) buffer.fill(0, at + s, at + fillEnd);
    const tailStart = Math.max(s, last * clusterSize);
    if (last >= first && tailStart < e) buffer.fill(0, at + tailStart, at + e);
  }
  return inHole;
}

/**
 * `nbdBatches` one Block at a time: zero runs, `sameAsBase` runs (with a dirty context)
 * and data Blocks viewing 2 MiB read buffers. The caller owns the client.
 */
export async function* nbdBlocks(client: NbdClient, options: NbdBlockSourceOptions = {}): AsyncGenerator<Block> {
  for await (const batch of nbdBatches(client, options)) yield* batch.blocks;
}

/** An NBD export opened as convert()'s input. */
export interface NbdInput {
  /** The export's size in bytes. */
  readonly size: number;
  /** The connection that negotiated the meta contexts (block status goes there). */
  readonly client: NbdClient;
  /** Every connection open so far: `client` first, then the siblings reads are spread over. */
  readonly connections: readonly NbdClient[];
  /** Data bytes the server has sent so far, over every connection. */
  readonly bytesRead: number;
  /** The Blocks of the export (a full read, or the dirty clusters when a bitmap was asked for). */
  blocks(clusterSize: number, pool?: BufferPool): AsyncGenerator<Block>;
  /** The same as batches (one per read buffer), the last one carrying `inputEnd`. */
  batches(clusterSize: number, pool?: BufferPool): AsyncGenerator<BlockBatch>;
  close(): Promise<void>;
}

/** Connections to an export that allows several (NBD_FLAG_CAN_MULTI_CONN), as nbdcopy opens. */
export const DEFAULT_NBD_CONNECTIONS = 4;

/**
 * Connects to `uri` for a conversion: negotiates `base:allocation` and, with `bitmap`, the dirty
 * bitmap's context, which the server must publish (NbdServerError otherwise). A declared `size`
 * must match the export's. When the server allows several connections and the reads pass
 * `SIBLINGS_AFTER` (64 MiB) bytes, up to `connections` (default 4) are opened in the background and
 * reads spread over them as they come up; one that cannot be made (a server limiting its
 * clients) is simply not used.
 */
export async function openNbdInput(
  uri: string,
  options: { bitmap?: string; size?: number; nbd?: { tls?: NbdTlsOptions; timeout?: number; connections?: number } },
): Promise<NbdInput> {
  const dirtyContext = options.bitmap === undefined ? undefined : dirtyBitmapContext(options.bitmap);
  if (options.bitmap !== undefined && (options.bitmap === '' || Buffer.byteLength(options.bitmap) > 1023)) {
    throw new InvalidArgumentError(`Invalid bitmap name '${options.bitmap}'`);
  }
  const wanted = options.nbd?.connections ?? DEFAULT_NBD_CONNECTIONS;
  if (!Number.isInteger(wanted) || wanted < 1 || wanted > 16) throw new InvalidArgumentError(`Invalid number of NBD connections ${wanted}: 1 to 16`);
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
  const connections: NbdClient[] = [client];
  // Siblings connect once a job proves long (nbdBatches says when) while the first connection
  // goes on reading: a server that admits fewer clients than it allows connections for leaves
  // an attempt waiting, which close() cancels.
  const cancel = new AbortController();
  let closed = false;
  const connecting: Array<Promise<void>> = [];
  const openSiblings = (): void => {
    if (closed || connecting.length > 0 || !(client.flags & NBD_FLAG.CAN_MULTI_CONN)) return;
    for (let i = 1; i < wanted; i++) {
      connecting.push(
        client.connectSibling({ signal: cancel.signal }).then(
          async (sibling) => {
            if (closed) await sibling.close();
            else connections.push(sibling);
          },
          () => {},
        ),
      );
    }
  };
  const sourceOptions = (clusterSize: number, pool: BufferPool | undefined): NbdBlockSourceOptions => ({
    clusterSize,
    connections,
    wantConnections: openSiblings,
    ...(pool ? { pool } : {}),
    ...(dirtyContext === undefined ? {} : { dirtyContext }),
  });
  return {
    size: client.size,
    client,
    connections,
    get bytesRead() {
      return connections.reduce((n, c) => n + c.stats.dataBytes, 0);
    },
    blocks: (clusterSize, pool) => nbdBlocks(client, sourceOptions(clusterSize, pool)),
    batches: (clusterSize, pool) => nbdBatches(client, sourceOptions(clusterSize, pool)),
    close: async () => {
      closed = true;
      cancel.abort();
      await Promise.all(connecting);
      await Promise.all(connections.map((c) => c.close()));
    },
  };
}
