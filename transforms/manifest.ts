/**
 * Fingerprint manifests: the XXH64 of every guest cluster of an image, in a compact binary
 * file, so the next backup can be compared against this one without reading it.
 *
 * Format, version 1 (all integers big-endian):
 *
 *   offset  size  field
 *   0       8     magic "Q2SMFST\0"
 *   8       4     version (1)
 *   12      4     hash kind (1 = XXH64, seed 0)
 *   16      4     cluster_bits
 *   20      4     header length in bytes (64); entries start here
 *   24      8     virtual size in bytes
 *   32      8     cluster count = ceil(virtual size / cluster size)
 *   40      24    reserved, zero
 *   64      8·n   fingerprint of guest cluster i, for i in [0, n): the XXH64 of its bytes as
 *                 the guest sees them (zeros included; the last cluster may be short)
 *
 * Equal fingerprints at the same index mean "unchanged" with a false-match probability of
 * 2^-64 per changed cluster (about 2^-37 over 2^27 clusters); XXH64 is not collision-resistant
 * against crafted input, so a guest could hide a change from an incremental backup of itself.
 * Use `--base IMAGE` (byte comparison) where that matters.
 */

import { open, type FileHandle } from 'node:fs/promises';
import { Writable } from 'node:stream';
import type { Block } from '../src/block.js';
import { CorruptImageError, fileError, InvalidArgumentError, UnexpectedEofError } from '../src/errors.js';
import { OffsetWriter } from '../src/io/output.js';
import { readFully } from '../src/io/files.js';
import { zeroBuffer } from '../src/io/buffers.js';
import type { Hasher } from './fingerprint.js';

/** The 8 bytes a manifest starts with. */
export const MANIFEST_MAGIC = 'Q2SMFST\0';
/** The manifest format version this library writes and reads. */
export const MANIFEST_VERSION = 1;
export const MANIFEST_HASH_XXH64 = 1;
/** Bytes of the manifest header; the fingerprints start here. */
export const MANIFEST_HEADER_LENGTH = 64;
const ENTRY = 8;
const FLUSH_ENTRIES = 8192;

/** A manifest's header fields (the magic and header length are implied). */
export interface ManifestHeader {
  /** Format version ({@link MANIFEST_VERSION}). */
  version: number;
  /** The fingerprint function: 1 = XXH64 with seed 0. */
  hashKind: number;
  /** log2 of the cluster size the fingerprints were taken at. */
  clusterBits: number;
  /** The image's virtual size in bytes. */
  virtualSize: number;
  /** Fingerprints in the file: ceil(virtualSize / cluster size). */
  clusterCount: number;
}

/** Encodes the 64-byte manifest header. */
export function encodeManifestHeader(header: ManifestHeader): Uint8Array {
  const out = new Uint8Array(MANIFEST_HEADER_LENGTH);
  const view = new DataView(out.buffer);
  out.set(new TextEncoder().encode(MANIFEST_MAGIC), 0);
  view.setUint32(8, header.version);
  view.setUint32(12, header.hashKind);
  view.setUint32(16, header.clusterBits);
  view.setUint32(20, MANIFEST_HEADER_LENGTH);
  view.setBigUint64(24, BigInt(header.virtualSize));
  view.setBigUint64(32, BigInt(header.clusterCount));
  return out;
}

/**
 * Decodes and checks a manifest header; a wrong magic, version or hash kind is a CorruptImageError
 * naming `path`.
 */
export function decodeManifestHeader(bytes: Uint8Array, path = 'manifest'): ManifestHeader {
  const structure = 'manifest header';
  if (bytes.length < MANIFEST_HEADER_LENGTH) throw new UnexpectedEofError(`'${path}' is too short for a manifest header`, { structure });
  if (new TextDecoder().decode(bytes.subarray(0, 8)) !== MANIFEST_MAGIC) {
    throw new CorruptImageError(`'${path}' is not a qcow2-stream manifest (bad magic)`, { structure, field: 'magic', offset: 0 });
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const header: ManifestHeader = {
    version: view.getUint32(8),
    hashKind: view.getUint32(12),
    clusterBits: view.getUint32(16),
    virtualSize: Number(view.getBigUint64(24)),
    clusterCount: Number(view.getBigUint64(32)),
  };
  if (header.version !== MANIFEST_VERSION) throw new CorruptImageError(`'${path}': unsupported manifest version ${header.version}`, { structure, field: 'version', offset: 8 });
  if (header.hashKind !== MANIFEST_HASH_XXH64) throw new CorruptImageError(`'${path}': unknown hash kind ${header.hashKind}`, { structure, field: 'hash kind', offset: 12 });
  if (header.clusterBits < 9 || header.clusterBits > 21) throw new CorruptImageError(`'${path}': cluster_bits ${header.clusterBits} out of range`, { structure, field: 'cluster_bits', offset: 16 });
  if (view.getUint32(20) !== MANIFEST_HEADER_LENGTH) throw new CorruptImageError(`'${path}': unexpected header length`, { structure, field: 'header length', offset: 20 });
  if (!Number.isSafeInteger(header.virtualSize) || header.clusterCount !== Math.ceil(header.virtualSize / 2 ** header.clusterBits)) {
    throw new CorruptImageError(`'${path}': cluster count does not match the virtual size`, { structure, field: 'cluster count', offset: 32 });
  }
  return header;
}

/** A block's length as the guest sees it: the virtual size is the input rounded up to 512. */
function guestLength(length: number): number {
  return Math.ceil(length / 512) * 512;
}

/**
 * The fingerprint a manifest records for a block: of its bytes as the guest sees them, so a
 * last cluster cut short by the input is hashed with its zero padding up to the sector.
 */
export function guestFingerprint(block: Block, hasher: Hasher): bigint {
  const length = guestLength(block.data.length);
  if (length === block.data.length) return (block.fingerprint ??= hasher.hash64(block.data));
  const padded = new Uint8Array(length);
  padded.set(block.data);
  return hasher.hash64(padded);
}

/** Options of {@link ManifestWriter.create}. */
export interface ManifestWriterOptions {
  /** The manifest's path (a regular file). */
  output: string;
  /** The XXH64 hasher (from `createHasher()`). */
  hasher: Hasher;
  /** Bytes per cluster of the image it describes (one fingerprint per cluster). */
  clusterSize: number;
  /** fsync the file (and its directory) before finish() resolves. Default true. */
  sync?: boolean;
  /** Replace an existing file at `output`. Default false (the CLI's --force). */
  overwrite?: boolean;
}

/**
 * Writes a manifest while blocks stream past. Blocks must arrive in guest order; clusters
 * never seen (a caller that skips blocks) are recorded as zero clusters.
 */
export class ManifestWriter {
  private readonly entries = new Uint8Array(FLUSH_ENTRIES * ENTRY);
  private readonly view = new DataView(this.entries.buffer);
  private pending = 0;
  private firstPending = 0;
  private nextIndex = 0;
  private readonly zeroFingerprints = new Map<number, bigint>();

  private constructor(
    private readonly output: OffsetWriter,
    private readonly hasher: Hasher,
    private readonly clusterBits: number,
  ) {}

  /**
   * Creates the manifest at `options.output` (a regular file, under a temporary name until
   * `finish`, fsynced with its directory unless `sync` is false). An existing file is replaced
   * only with `overwrite`.
   */
  static async create(options: ManifestWriterOptions): Promise<ManifestWriter> {
    const { output: path, hasher, clusterSize } = options;
    const clusterBits = Math.log2(clusterSize);
    if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
      throw new InvalidArgumentError(`Invalid cluster size ${clusterSize}: it must be a power of two from 512 bytes to 2 MiB`);
    }
    const output = await OffsetWriter.create(path, { label: 'manifest', sync: options.sync ?? true, overwrite: options.overwrite ?? false });
    if (output.kind !== 'file') {
      await output.abort();
      throw new InvalidArgumentError(`The manifest '${path}' must be a regular file (its header is written last)`);
    }
    return new ManifestWriter(output, hasher, clusterBits);
  }

  /**
   * Records a block (zero blocks are hashed once per length, not per cluster; a zero run adds
   * `count` zero fingerprints without hashing anything).
   */
  async add(block: Block): Promise<void> {
    const clusterSize = 2 ** this.clusterBits;
    if (this.nextIndex < block.index) await this.pushRepeated(this.zeroFingerprint(clusterSize), block.index - this.nextIndex);
    if (block.index !== this.nextIndex) throw new RangeError(`ManifestWriter: block ${block.index} out of order`);
    if (block.count !== undefined) await this.pushRepeated(this.zeroFingerprint(clusterSize), block.count);
    else await this.push(block.zero ? this.zeroFingerprint(guestLength(block.data.length)) : guestFingerprint(block, this.hasher));
  }

  /**
   * Records a block left unchanged from the base (`sameAsBase`, often a run whose bytes were
   * never read, as an incremental from a dirty bitmap yields): each cluster's fingerprint is
   * copied from the base's manifest; past the base's end it is the zero fingerprint.
   */
  async addUnchanged(block: Block, base: ManifestReader): Promise<void> {
    if (!block.sameAsBase) return this.add(block);
    if (base.header.clusterBits !== this.clusterBits) throw new InvalidArgumentError(`The base manifest '${base.path}' uses another cluster size`);
    const clusterSize = 2 ** this.clusterBits;
    if (this.nextIndex < block.index) await this.pushRepeated(this.zeroFingerprint(clusterSize), block.index - this.nextIndex);
    if (block.index !== this.nextIndex) throw new RangeError(`ManifestWriter: block ${block.index} out of order`);
    const end = block.index + (block.count ?? 1);
    for (let index = block.index; index < end; index++) {
      await this.push((await base.fingerprintAt(index)) ?? this.zeroFingerprint(index === end - 1 && block.count === undefined ? guestLength(block.data.length) : clusterSize));
    }
  }

  /** Writes the header for the image's size (rounded up to 512, as the virtual size is) and moves the file into place. */
  async finish(inputLength: number): Promise<void> {
    const virtualSize = guestLength(inputLength);
    const clusterSize = 2 ** this.clusterBits;
    const count = Math.ceil(virtualSize / clusterSize);
    if (this.nextIndex < count - 1) await this.pushRepeated(this.zeroFingerprint(clusterSize), count - 1 - this.nextIndex);
    if (this.nextIndex === count - 1) await this.push(this.zeroFingerprint(virtualSize - this.nextIndex * clusterSize));
    await this.flush();
    await this.output.write(0, encodeManifestHeader({
      version: MANIFEST_VERSION,
      hashKind: MANIFEST_HASH_XXH64,
      clusterBits: this.clusterBits,
      virtualSize,
      clusterCount: count,
    }));
    await this.output.finish(MANIFEST_HEADER_LENGTH + count * ENTRY);
    await this.output.commit();
  }

  /** Removes the temporary file after a failure. */
  async abort(): Promise<void> {
    await this.output.abort();
  }

  private zeroFingerprint(length: number): bigint {
    let fingerprint = this.zeroFingerprints.get(length);
    if (fingerprint === undefined) {
      fingerprint = this.hasher.hash64(zeroBuffer(length));
      this.zeroFingerprints.set(length, fingerprint);
    }
    return fingerprint;
  }

  private async push(fingerprint: bigint): Promise<void> {
    this.view.setBigUint64(this.pending * ENTRY, fingerprint);
    this.pending++;
    this.nextIndex++;
    if (this.pending === FLUSH_ENTRIES) await this.flush();
  }

  /** Appends `count` copies of one fingerprint (zero runs, skipped clusters) without a call per entry. */
  private async pushRepeated(fingerprint: bigint, count: number): Promise<void> {
    while (count > 0) {
      const n = Math.min(count, FLUSH_ENTRIES - this.pending);
      const first = this.pending * ENTRY;
      this.view.setBigUint64(first, fingerprint);
      // Double the filled span each step: log2(n) copies instead of n BigInt writes.
      for (let filled = 1; filled < n; filled *= 2) {
        this.entries.copyWithin(first + filled * ENTRY, first, first + Math.min(filled, n - filled) * ENTRY);
      }
      this.pending += n;
      this.nextIndex += n;
      count -= n;
      if (this.pending === FLUSH_ENTRIES) await this.flush();
    }
  }

  private async flush(): Promise<void> {
    if (this.pending === 0) return;
    // A copy: the entry buffer is reused while the write is still in flight on some outputs.
    await this.output.write(MANIFEST_HEADER_LENGTH + this.firstPending * ENTRY, this.entries.slice(0, this.pending * ENTRY));
    this.firstPending += this.pending;
    this.pending = 0;
  }
}

/** A Writable of Blocks that records a manifest (for pipelines); finish with `end()`. */
export function createManifestSink(writer: ManifestWriter, virtualSize: () => number): Writable {
  return new Writable({
    objectMode: true,
    write(block: Block, _encoding, done) {
      writer.add(block).then(() => done(), done);
    },
    final(done) {
      writer.finish(virtualSize()).then(() => done(), done);
    },
    destroy(err, done) {
      if (err) writer.abort().then(() => done(err), () => done(err));
      else done(null);
    },
  });
}

/** Random access to a manifest's fingerprints (reads 8192 entries at a time). */
export class ManifestReader {
  private chunkStart = -1;
  private readonly chunk = new Uint8Array(FLUSH_ENTRIES * ENTRY);
  private readonly chunkView = new DataView(this.chunk.buffer);

  private constructor(
    private readonly handle: FileHandle,
    /** The manifest's path, for messages. */
    readonly path: string,
    /** The manifest's header. */
    readonly header: ManifestHeader,
  ) {}

  /** Opens a manifest and checks its header and length. */
  static async open(path: string): Promise<ManifestReader> {
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (err) {
      throw fileError(err, 'open the manifest', path);
    }
    try {
      const head = new Uint8Array(MANIFEST_HEADER_LENGTH);
      await readFully(handle, head, 0, head.length, 0, path);
      const header = decodeManifestHeader(head, path);
      const { size } = await handle.stat();
      if (size < MANIFEST_HEADER_LENGTH + header.clusterCount * ENTRY) {
        throw new UnexpectedEofError(`'${path}' is shorter than its ${header.clusterCount} entries`, { structure: 'manifest' });
      }
      return new ManifestReader(handle, path, header);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  /** The fingerprint of guest cluster `index`, or undefined past the manifest's end. */
  async fingerprintAt(index: number): Promise<bigint | undefined> {
    if (index < 0 || index >= this.header.clusterCount) return undefined;
    const start = index - (index % FLUSH_ENTRIES);
    if (start !== this.chunkStart) {
      const count = Math.min(FLUSH_ENTRIES, this.header.clusterCount - start);
      await readFully(this.handle, this.chunk, 0, count * ENTRY, MANIFEST_HEADER_LENGTH + start * ENTRY, this.path);
      this.chunkStart = start;
    }
    return this.chunkView.getBigUint64((index - start) * ENTRY);
  }

  /** Closes the file. */
  async close(): Promise<void> {
    await this.handle.close();
  }
}
