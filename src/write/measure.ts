/**
 * `measure()`: how much space a conversion needs, in qemu-img measure's terms — `required` (what
 * this input will take) and `fullyAllocated` (every cluster stored) — for every layout:
 *
 * - external: the metadata file and the data file separately (qemu 7.2's measure ignores
 *   data_file and reports the whole disk as if it were in the .qcow2);
 * - internal: the one file, exactly as the pipe writer lays it out (pass 1 of
 *   internal-stream.ts is the measurement); the file writer's image is within a cluster or two
 *   of it (its L2 tables sit between the data);
 * - compressed: the input is compressed as the conversion would compress it, so `required` is
 *   what the compressor gives here; with `--size` alone it cannot be known and `fullyAllocated`
 *   is the uncompressed bound;
 * - overlays (`base`): clusters equal to the base are not counted.
 *
 * Without an input (`size` only), `required` is an empty image's metadata.
 */

import type { Block } from '../block.js';
import { InvalidArgumentError } from '../errors.js';
import { checkOptionsObject, describeValue } from '../internal/arguments.js';
import { checkVirtualSize, imageGeometry, planMetadata, roundUpToSector } from '../format/index.js';
import { zeroDetect } from '../../transforms/zero-detect.js';
import { checkCompressionType, type CompressionType } from './compress.js';
import { InternalPlan } from './internal-stream.js';
import { checkDedupSharing, resolveImageSettings, type ImageOptions } from './settings.js';
import { BufferPool, openInput, readBlocks } from './sources.js';

/** Options of {@link measure}. */
export interface MeasureOptions extends ImageOptions {
  /** A raw image to measure (a regular file). Either this or `size`. */
  input?: string;
  /** A virtual size in bytes, for an empty image. */
  size?: number;
  /** `external` (default) or `internal`, as in convert(). */
  layout?: 'external' | 'internal';
  /** Compressed clusters (internal layout). */
  compression?: CompressionType;
  /** Worker threads compressing. Default: one per core. */
  compressionThreads?: number;
  /** Share identical clusters (internal layout). */
  dedup?:
    | boolean
    | {
        /** Most distinct clusters indexed, as in convert(). */
        maxEntries?: number;
      };
  /** An earlier image of the disk: measure the overlay convert() would write over it. */
  base?: string;
  /** Follow names stored inside the base even outside its directory. */
  allowUnsafePaths?: boolean;
}

/** Bytes one file needs. */
export interface FileMeasure {
  /** What this input takes. */
  required: number;
  /** What it takes with every guest cluster stored. */
  fullyAllocated: number;
}

/** What {@link measure} found. */
export interface MeasureResult extends FileMeasure {
  /** The layout measured. */
  layout: 'external' | 'internal';
  /** The virtual size (rounded up to 512). */
  virtualSize: number;
  /** Bytes per cluster. */
  clusterSize: number;
  /** External layout: the metadata file and the data file (required counts its allocated bytes; its length is the virtual size). */
  files?: {
    /** The .qcow2 metadata file. */
    metadata: FileMeasure;
    /** The raw data file. */
    dataFile: FileMeasure;
  };
  /** Compressed images: the type, and whether `required` comes from compressing the input (`measured`) or is unknown (`bound`: only `fullyAllocated` holds). */
  compression?: {
    /** The compression type. */
    type: CompressionType;
    /** `measured`: from compressing the input; `bound`: no input, so only `fullyAllocated` holds. */
    required: 'measured' | 'bound';
  };
}

/** Measures the space a conversion with these options needs; writes nothing. */
export async function measure(options: MeasureOptions): Promise<MeasureResult> {
  checkOptionsObject(options, 'measure()');
  if (options.size !== undefined && typeof options.size !== 'number') throw new InvalidArgumentError(`measure(): size must be a number, not ${describeValue(options.size)}`);
  const layout = options.layout ?? 'external';
  if (layout !== 'external' && layout !== 'internal') throw new InvalidArgumentError(`Unknown layout ${describeValue(layout)}: use 'external' or 'internal'`);
  if ((options.input === undefined) === (options.size === undefined)) throw new InvalidArgumentError('measure needs an input image or a size (one of them)');
  if (options.compression !== undefined) {
    if (layout === 'external') {
      const { CompressionUnsupportedError } = await import('../errors.js');
      throw new CompressionUnsupportedError('Compressed clusters cannot be written with an external data file: the qcow2 spec forbids them there', 'layout', {
        hint: "Add --internal (API: layout: 'internal')",
      });
    }
    checkCompressionType(options.compression);
  }
  if (options.dedup && layout === 'external') throw new InvalidArgumentError('Dedup needs the internal layout');
  if (options.base !== undefined && options.input === undefined) throw new InvalidArgumentError('--base (API: base) needs an input image to compare (API: input)');
  const settings = resolveImageSettings({ ...options, dataFileRaw: layout === 'external' && options.base === undefined && (options.dataFileRaw ?? true) });
  // The same refusal as convert's: an image measured is one convert would write.
  if (options.dedup) checkDedupSharing(settings);
  const { clusterBits, clusterSize: cs, refcountOrder } = settings;

  const input = options.input === undefined ? undefined : await openInput(options.input);
  try {
    if (input && !input.target.positional) throw new InvalidArgumentError(`measure reads a regular file; '${input.name}' is not one`);
    const size = roundUpToSector(input ? input.size! : options.size!);
    if (!Number.isSafeInteger(size) || size < 0) throw new InvalidArgumentError(`Invalid size ${describeValue(options.size)}`);
    checkVirtualSize(size, clusterBits);
    const geometry = imageGeometry(size, clusterBits);
    const full = planMetadata({ geometry, refcountOrder, l2Tables: geometry.l1Size });
    const backing = options.base === undefined ? undefined : { name: options.base, format: 'qcow2' };

    let plan: InternalPlan | undefined;
    if (input) {
      const needsHasher = Boolean(options.dedup);
      const hasher = needsHasher ? await (await import('../../transforms/fingerprint.js')).createHasher() : undefined;
      const dedup = options.dedup ? { hasher: hasher!, ...(options.dedup === true || options.dedup.maxEntries === undefined ? {} : { maxEntries: options.dedup.maxEntries }) } : undefined;
      const target = input.target;
      plan = new InternalPlan({
        clusterBits,
        refcountOrder,
        size,
        compression: options.compression,
        backing,
        dedup: dedup && {
          ...dedup,
          readCluster: async (guest, length) => {
            const out = new Uint8Array(length);
            await target.read(out, 0, length, guest * cs);
            return out;
          },
        },
      });
      const pool = new BufferPool();
      let blocks: AsyncIterable<Block> = zeroDetect(readBlocks(target, { clusterSize: cs, size: input.size!, zeroRuns: true, pool }));
      const closers: Array<() => Promise<void>> = [];
      try {
        if (options.base !== undefined) {
          const { openDisk } = await import('../read/image.js');
          const base = await openDisk(options.base, options.allowUnsafePaths ? { allowUnsafePaths: true } : {});
          closers.push(() => base.close());
          blocks = (await import('../../transforms/base-compare.js')).compareWithBase(blocks, { base, clusterSize: cs }).blocks;
        }
        if (options.compression) {
          const { CompressorPool, compressBlocks } = await import('./compress.js');
          const compressor = CompressorPool.create({
            type: options.compression,
            clusterSize: cs,
            ...(options.compressionThreads === undefined ? {} : { threads: options.compressionThreads }),
          });
          closers.push(() => compressor.close());
          blocks = compressBlocks(blocks, { pool: compressor });
        }
        for await (const block of blocks) {
          await plan.record(block);
          pool.release(block.data);
        }
      } finally {
        for (const close of closers) await close().catch(() => {});
      }
      plan.finish();
    }

    const result: MeasureResult = { layout, virtualSize: size, clusterSize: cs, required: 0, fullyAllocated: 0 };
    if (layout === 'internal') {
      result.required = plan ? plan.fileBytes : planMetadata({ geometry, refcountOrder, l2Tables: 0 }).totalClusters * cs;
      result.fullyAllocated = planMetadata({ geometry, refcountOrder, l2Tables: geometry.l1Size, extraClusters: geometry.clusters }).totalClusters * cs;
      if (options.compression) result.compression = { type: options.compression, required: plan ? 'measured' : 'bound' };
    } else {
      // Raw mode maps every cluster, so the metadata depends on the size alone; sparse mode
      // (no raw bit, or an overlay) writes only the L2 tables that map something.
      const l2Tables = settings.dataFileRaw ? geometry.l1Size : (plan?.plan.l2Tables ?? 0);
      const metadata = { required: planMetadata({ geometry, refcountOrder, l2Tables }).totalClusters * cs, fullyAllocated: full.totalClusters * cs };
      const dataFile = { required: plan ? plan.dataBytes : 0, fullyAllocated: size };
      result.files = { metadata, dataFile };
      result.required = metadata.required + dataFile.required;
      result.fullyAllocated = metadata.fullyAllocated + dataFile.fullyAllocated;
    }
    return result;
  } finally {
    await input?.close();
  }
}
