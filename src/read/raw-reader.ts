/**
 * The raw reader: a plain file or block device, read as the guest image.
 */

import { BaseImage, ByteSource, openSeekable, plain, type OpenContext, type Segment } from './base-image.js';
import type { DiskImage } from './image.js';

const RAW_GRANULE = 64 * 1024;

/**
 * A raw file. Like qemu's block layer, its size is rounded up to whole 512-byte sectors and the
 * padding reads as zeros, so a raw file of 600,000 bytes compares equal to the qcow2 that
 * qemu-img makes of it (600,064 bytes).
 */
class RawImage extends BaseImage {
  readonly format = 'raw' as const;
  readonly clusterSize = RAW_GRANULE;
  readonly header = undefined;
  readonly backing = undefined;
  readonly dataFilePath = undefined;
  readonly virtualSize: number;

  constructor(
    path: string,
    warnings: string[],
    private readonly source: ByteSource,
  ) {
    super(path, warnings);
    this.virtualSize = Math.ceil(source.size / 512) * 512;
  }

  async *segments(start: number, end: number): AsyncGenerator<Segment> {
    const dataEnd = Math.min(end, this.source.size);
    if (dataEnd > start) {
      yield { start, length: dataEnd - start, kind: 'data', depth: 0, source: this.source, hostOffset: start, compressed: undefined };
    }
    const padStart = Math.max(start, this.source.size);
    if (end > padStart) yield plain(padStart, end - padStart, 'zero');
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.source.handle.close().catch(() => {});
  }
}

export async function openRaw(path: string, context: OpenContext): Promise<DiskImage> {
  const file = await openSeekable(path, 'raw image', context.storedNames.get(path));
  return new RawImage(path, context.warnings, new ByteSource(file.handle, path, file.size, 'raw image', context.warn));
}
