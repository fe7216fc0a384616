/**
 * Host-cluster allocation for a single-file image, shared by the file writer
 * (internal-sink.ts) and the planned writer for pipes (internal-stream.ts), so both place
 * clusters the same way.
 *
 * Clusters are handed out in increasing order. Compressed clusters are packed byte by byte as
 * qemu's qcow2_alloc_bytes packs them: each starts right after the previous one, in the same
 * host cluster while it fits and the cluster's refcount is below the maximum, running on into the
 * next host cluster when that one is the next to be allocated; every host cluster a compressed
 * cluster touches gains one reference. Allocating a whole cluster (data, L2 table) closes the
 * partly filled one, so host offsets only grow: the data can be written strictly in order.
 *
 * With `counts`, the refcount of every host cluster is kept (one entry of the refcount width
 * each), which compressed images need: a host cluster holds several compressed clusters.
 */

/** A growable array of per-host-cluster reference counts. */
export class HostRefcounts {
  private counts: Uint32Array = new Uint32Array(1024);
  /** One past the highest host cluster counted. */
  length = 0;

  /** The count of host cluster `host`. */
  get(host: number): number {
    return host < this.counts.length ? (this.counts[host] ?? 0) : 0;
  }

  /** Adds `by` to host cluster `host`. */
  add(host: number, by = 1): void {
    if (host >= this.counts.length) {
      let size = this.counts.length;
      while (size <= host) size *= 2;
      const grown = new Uint32Array(size);
      grown.set(this.counts);
      this.counts = grown;
    }
    this.counts[host] = (this.counts[host] ?? 0) + by;
    if (host >= this.length) this.length = host + 1;
  }
}

/**
 * How many whole clusters may be allocated while a partly filled compressed cluster stays open
 * for more compressed clusters (qemu keeps it open for ever; we stop after this many bytes, so a
 * writer never holds more than that behind it to write in order, and a pipe can take the image).
 */
export const PACK_WINDOW_BYTES = 8 * 1024 * 1024;

/** Places clusters in a single-file image (see the module comment). */
export class HostAllocator {
  /** The next whole host cluster. */
  nextHost: number;
  /** The host cluster compressed clusters are being packed into; −1 = none. */
  packHost = -1;
  /** Byte offset where the next compressed cluster may start (in packHost). */
  private partial = 0;
  /** Whole clusters allocated since packHost opened. */
  private wholeSince = 0;
  private readonly cs: number;
  private readonly window: number;

  constructor(
    clusterBits: number,
    firstHost: number,
    /** The largest refcount a host cluster may reach (the refcount width). */
    private readonly maxRefcount: number,
    /** Per-host-cluster counts, when the caller needs them (compressed images). */
    readonly counts?: HostRefcounts,
  ) {
    this.cs = 2 ** clusterBits;
    this.window = Math.max(1, Math.floor(PACK_WINDOW_BYTES / this.cs));
    this.nextHost = firstHost;
  }

  /** Allocates a whole cluster (refcount 1); returns its host cluster index. */
  cluster(): number {
    const host = this.nextHost++;
    this.counts?.add(host);
    if (this.packHost >= 0 && ++this.wholeSince >= this.window) this.packHost = -1;
    return host;
  }

  /** Allocates `size` bytes (1 ≤ size < cluster size) for a compressed cluster; returns its byte offset. */
  compressed(size: number): number {
    if (!(size >= 1 && size < this.cs)) throw new RangeError(`Compressed size ${size} is not below the cluster size`);
    let offset = this.packHost >= 0 ? this.partial : 0;
    // qemu: a cluster whose refcount is at the maximum takes no more compressed clusters.
    if (offset && (this.counts?.get(this.packHost) ?? 0) >= this.maxRefcount) offset = 0;
    if (!offset || this.cs - (offset % this.cs) < size) {
      if (offset && this.packHost + 1 === this.nextHost) {
        // Run on into the next cluster, which is the next one free (qcow2_alloc_bytes).
        this.nextHost++;
      } else {
        offset = this.nextHost++ * this.cs;
      }
    }
    this.reference(offset, size);
    const end = offset + size;
    this.packHost = Math.floor((end - 1) / this.cs);
    this.wholeSince = 0;
    this.partial = end;
    if (end % this.cs === 0) this.packHost = -1;
    return offset;
  }

  /** Adds one reference to every host cluster that bytes [offset, offset + size) touch. */
  reference(offset: number, size: number): void {
    if (!this.counts) return;
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let host = Math.floor(offset / this.cs); host <= last; host++) this.counts.add(host);
  }

  /** Whether bytes [offset, offset + size) can take one more reference without overflowing a refcount. */
  canReference(offset: number, size: number): boolean {
    if (!this.counts) return true;
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let host = Math.floor(offset / this.cs); host <= last; host++) if (this.counts.get(host) >= this.maxRefcount) return false;
    return true;
  }
}

/** What a {@link HostQueue} holds for one host cluster not yet written. */
interface Slot {
  /** The cluster's bytes (a short last data cluster may be shorter). */
  data: Uint8Array;
  /** A cluster compressed clusters are still being packed into: nothing from here on is written. */
  open: boolean;
  /** Released once written. */
  token?: unknown;
}

/**
 * Host clusters placed by a {@link HostAllocator}, written strictly in increasing order: a
 * cluster is written once every cluster before it is known (the packed cluster still open holds
 * back what was allocated after it, at most {@link PACK_WINDOW_BYTES}).
 */
export class HostQueue {
  private slots: Array<Slot | undefined> = [];
  /** Host cluster of slots[0]: everything before it is written. */
  private base: number;
  private readonly cs: number;

  constructor(
    clusterBits: number,
    firstHost: number,
    /** Writes `chunks` back to back at byte `offset`; `tokens` are those of the clusters written. */
    private readonly sink: (offset: number, chunks: Uint8Array[], tokens: unknown[]) => Promise<void>,
  ) {
    this.cs = 2 ** clusterBits;
    this.base = firstHost;
  }

  /** Bytes held (not yet written). */
  get heldBytes(): number {
    return this.slots.length * this.cs;
  }

  /** Places a whole cluster's bytes at host cluster `host`. */
  place(host: number, data: Uint8Array, token?: unknown): void {
    this.slots[host - this.base] = token === undefined ? { data, open: false } : { data, open: false, token };
  }

  /** Copies compressed bytes to byte `offset`, into packed clusters (opened as needed). */
  placeBytes(offset: number, bytes: Uint8Array): void {
    let pos = 0;
    while (pos < bytes.length) {
      const at = offset + pos;
      const host = Math.floor(at / this.cs);
      const i = host - this.base;
      let slot = this.slots[i];
      if (!slot) this.slots[i] = slot = { data: new Uint8Array(this.cs), open: true };
      const n = Math.min(bytes.length - pos, this.cs - (at % this.cs));
      slot.data.set(bytes.subarray(pos, pos + n), at % this.cs);
      pos += n;
    }
  }

  /** Closes every packed cluster but `packHost` (the allocator's open one). */
  closePacks(packHost: number): void {
    for (let i = 0; i < this.slots.length; i++) {
      const slot = this.slots[i];
      if (slot?.open && this.base + i !== packHost) slot.open = false;
    }
  }

  /** Bytes [offset, offset + length) if they are still held here, else undefined. */
  read(offset: number, length: number): Uint8Array | undefined {
    const host = Math.floor(offset / this.cs);
    const slot = this.slots[host - this.base];
    if (!slot || host < this.base) return undefined;
    const at = offset % this.cs;
    if (at + length <= this.cs) return at + length <= slot.data.length ? slot.data.subarray(at, at + length) : undefined;
    const next = this.slots[host + 1 - this.base];
    if (!next) return undefined;
    const out = new Uint8Array(length);
    out.set(slot.data.subarray(at));
    out.set(next.data.subarray(0, length - (this.cs - at)), this.cs - at);
    return out;
  }

  /** Writes the clusters that are ready (with `all`, every one: the end of the image). */
  async flush(all = false): Promise<void> {
    let n = 0;
    while (n < this.slots.length && this.slots[n] && (all || !this.slots[n]!.open)) n++;
    if (n === 0) return;
    const taken = this.slots.splice(0, n) as Slot[];
    const chunks: Uint8Array[] = [];
    taken.forEach((slot, i) => {
      chunks.push(slot.data);
      // A short last data cluster: zeros up to the next cluster, so the write stays one.
      if (slot.data.length < this.cs && i < taken.length - 1) chunks.push(new Uint8Array(this.cs - slot.data.length));
    });
    const offset = this.base * this.cs;
    this.base += n;
    await this.sink(offset, chunks, taken.flatMap((slot) => (slot.token === undefined ? [] : [slot.token])));
  }
}
