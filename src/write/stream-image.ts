/**
 * Images from a pipe, where the format allows reading front to back in one pass:
 *
 * - the first bytes are probed (src/read/probe.ts) and replayed, so a raw stream loses nothing;
 * - a **streamOptimized VMDK** is parsed marker by marker (src/read/vmdk-reader.ts) and its
 *   grains assembled into Blocks, holes between them as zero runs; memory is a grain and a
 *   cluster;
 * - a **fixed VHD** (given with `-f vpc`: its footer is at the end, so a probe cannot see it) is
 *   raw data followed by a 512-byte footer: the stream is read with the last sector held back,
 *   and the footer is checked when the input ends;
 * - any other image format needs random access: NotSeekableError, with the hint to write the
 *   input to a file first; recognised formats no reader opens are refused by name.
 */

import { zeroRun, type Block } from '../block.js';
import { CorruptImageError, NotSeekableError } from '../errors.js';
import { zeroBuffer } from '../io/buffers.js';
import type { ImageFormat } from '../read/image.js';
import { assertReadable, detectFormat, formatName, isVhdFooter, PROBE_HEAD_BYTES } from '../read/probe.js';
import { decodeVhdFooter, vhdVirtualSize } from '../read/vhd-reader.js';
import { streamOptimizedGrains, type SequentialBytes } from '../read/vmdk-reader.js';
import { MAX_ZERO_RUN_BYTES, type ReadTarget } from './sources.js';

const SECTOR = 512;

/** A ReadTarget that first replays `prefix`, then reads `inner`. */
export function prefixedTarget(prefix: Uint8Array, inner: ReadTarget): ReadTarget {
  let replayed = 0;
  return {
    name: inner.name,
    positional: false,
    read: async (buffer, offset, length) => {
      if (replayed < prefix.length) {
        const n = Math.min(length, prefix.length - replayed);
        buffer.set(prefix.subarray(replayed, replayed + n), offset);
        replayed += n;
        return n;
      }
      return inner.read(buffer, offset, length, null);
    },
  };
}

/** Reads up to `length` bytes from a sequential target (fewer only at its end). */
async function readUpTo(target: ReadTarget, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const n = await target.read(out, done, length - done, null);
    if (n === 0) break;
    done += n;
  }
  return out.subarray(0, done);
}

/** SequentialBytes over a ReadTarget. */
function sequential(target: ReadTarget): SequentialBytes {
  const scratch = new Uint8Array(64 * 1024);
  return {
    read: (length) => readUpTo(target, length),
    skip: async (length) => {
      for (let left = length; left > 0; ) {
        const n = await target.read(scratch, 0, Math.min(left, scratch.length), null);
        if (n === 0) return false;
        left -= n;
      }
      return true;
    },
  };
}

/**
 * Pieces of guest data in increasing, non-overlapping order → Blocks of `clusterSize` (the last
 * one short), every cluster in between a zero run. A piece that covers a whole cluster is passed
 * on as a view (each piece is a fresh buffer, never reused); partial clusters are assembled.
 */
export async function* assembleBlocks(pieces: AsyncIterable<{ offset: number; data: Uint8Array }>, size: () => number, clusterSize: number): AsyncGenerator<Block> {
  let next = 0; // the first cluster not yet yielded
  let partial: { index: number; data: Uint8Array } | undefined;
  const lengthOf = (index: number) => Math.min(clusterSize, size() - index * clusterSize);
  function* zerosUpTo(end: number): Generator<Block> {
    const maxRun = MAX_ZERO_RUN_BYTES / clusterSize;
    while (next < end) {
      const length = lengthOf(next);
      if (length < clusterSize) {
        yield { index: next, data: zeroBuffer(clusterSize).subarray(0, length), zero: true };
        next++;
        continue;
      }
      const count = Math.min(maxRun, end - next, Math.floor((size() - next * clusterSize) / clusterSize));
      yield zeroRun(next, count, clusterSize);
      next += count;
    }
  }
  function* flush(): Generator<Block> {
    if (!partial) return;
    yield { index: partial.index, data: partial.data.subarray(0, lengthOf(partial.index)) };
    next = partial.index + 1;
    partial = undefined;
  }
  for await (const piece of pieces) {
    for (let pos = 0; pos < piece.data.length; ) {
      const at = piece.offset + pos;
      const index = Math.floor(at / clusterSize);
      const within = at - index * clusterSize;
      const take = Math.min(clusterSize - within, piece.data.length - pos);
      if (partial && partial.index !== index) yield* flush();
      if (!partial) {
        yield* zerosUpTo(index);
        if (within === 0 && take === lengthOf(index)) {
          yield { index, data: piece.data.subarray(pos, pos + take) };
          next = index + 1;
          pos += take;
          continue;
        }
        partial = { index, data: new Uint8Array(clusterSize) };
      }
      partial.data.set(piece.data.subarray(pos, pos + take), within);
      pos += take;
    }
  }
  yield* flush();
  yield* zerosUpTo(Math.ceil(size() / clusterSize));
}

/**
 * A fixed VHD read from a stream: every byte but the last 512 (the footer, held back until the
 * input ends). `footer()` checks it once the stream is done and returns the disk's size.
 */
export function fixedVhdTarget(inner: ReadTarget): ReadTarget & { check(dataBytes: number): void } {
  let held = new Uint8Array(0);
  let ended = false;
  return {
    name: inner.name,
    positional: false,
    read: async (buffer, offset, length) => {
      while (!ended) {
        if (held.length > SECTOR) {
          const n = Math.min(length, held.length - SECTOR);
          buffer.set(held.subarray(0, n), offset);
          held = held.subarray(n);
          return n;
        }
        const chunk = new Uint8Array(Math.max(length, 64 * 1024) + SECTOR);
        chunk.set(held);
        const n = await inner.read(chunk, held.length, chunk.length - held.length, null);
        if (n === 0) ended = true;
        held = chunk.subarray(0, held.length + n);
      }
      return 0;
    },
    check: (dataBytes) => {
      const corrupt = (why: string) => new CorruptImageError(`'${inner.name}' is not a fixed VHD: ${why}`, { structure: 'VHD footer' });
      if (held.length !== SECTOR || !isVhdFooter(held)) throw corrupt('it does not end in a valid VHD footer (cookie "conectix", checksum)');
      const footer = decodeVhdFooter(held);
      if (footer.diskType !== 2) throw corrupt(`its footer says disk type ${footer.diskType} (a dynamic or differencing VHD needs random access: write it to a file first)`);
      const size = vhdVirtualSize(footer);
      if (size !== dataBytes) throw corrupt(`its footer gives a size of ${size} bytes, but ${dataBytes} bytes came before it`);
    },
  };
}

/** What a stream input turned out to be. */
export type StreamInput =
  | { kind: 'raw'; target: ReadTarget }
  | { kind: 'fixed-vhd'; target: ReadTarget; check(dataBytes: number): void }
  | { kind: 'blocks'; format: ImageFormat; size: Promise<number>; blocks: AsyncGenerator<Block> };

/**
 * Decides how to read a sequential input: probed from its first bytes unless `format` is given.
 * Raw streams (and fixed VHDs, given with `format: 'vpc'`) go on through the raw sources;
 * a streamOptimized VMDK becomes Blocks here; anything else is refused.
 */
export async function openStreamInput(target: ReadTarget, format: ImageFormat | undefined, clusterSize: number): Promise<StreamInput> {
  if (format === 'raw') return { kind: 'raw', target };
  const needsFile = (what: string) =>
    new NotSeekableError(`Reading ${what} needs random access, but '${target.name}' is a pipe`, { hint: 'Write the input to a file first, then convert the file' });
  if (format === 'vpc') {
    const vhd = fixedVhdTarget(target);
    return { kind: 'fixed-vhd', target: vhd, check: vhd.check };
  }
  const head = await readUpTo(target, PROBE_HEAD_BYTES);
  const detected = detectFormat(head);
  const replay = prefixedTarget(head, target);
  const chosen = format ?? detected;
  if (chosen === 'raw') return { kind: 'raw', target: replay };
  assertReadable(chosen, target.name);
  if (chosen !== 'vmdk' || detected !== 'vmdk') throw needsFile(`a ${formatName(chosen)} image`);
  let capacity: ((size: number) => void) | undefined;
  let failed: ((err: unknown) => void) | undefined;
  const size = new Promise<number>((resolve, reject) => {
    capacity = resolve;
    failed = reject;
  });
  size.catch(() => {});
  let known = 0;
  const grains = streamOptimizedGrains(sequential(replay), target.name, (header) => {
    known = header.capacitySectors * SECTOR;
    capacity!(known);
  });
  // The header is read before any block is asked for: the size is known before the writer opens.
  const firstGrain = grains.next().catch((err: unknown) => {
    failed!(err);
    throw err;
  });
  // Whoever reads the blocks sees a failure; an unread one must not crash the process.
  firstGrain.catch(() => {});
  async function* all(): AsyncGenerator<{ offset: number; data: Uint8Array }> {
    const first = await firstGrain;
    if (first.done) return;
    yield first.value;
    yield* grains;
  }
  return { kind: 'blocks', format: 'vmdk', size, blocks: assembleBlocks(all(), () => known, clusterSize) };
}
