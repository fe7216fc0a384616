/**
 * qemu's metadata-preallocation heuristic (qcow2_detect_metadata_preallocation): an image whose
 * refcounts claim clearly more clusters than its file has allocated (`preallocation=metadata`,
 * or clusters left sparse after `snapshot -a`) is taken to have clusters that exist in the
 * metadata only. For such an image `qemu-img map` asks the file below for its holes and reports
 * them as zeros; `map` does the same (src/read/map.ts), so the answer is qemu's.
 *
 * The rule, as qemu has it: `real` = the file's allocated bytes (st_blocks × 512) / cluster size,
 * `threshold` = max(real × 10 / 9, real + 2); the image is preallocated when at least
 * `threshold` clusters of the file have a non-zero refcount. Only the image file is read (its
 * header, refcount table and the refcount blocks needed to reach the threshold).
 */

import {
  decodeRefcountTableEntry,
  getRefcount,
  refcountsPerBlock,
} from '../format/index.js';
import { fileError } from '../errors.js';
import { readFully } from '../io/files.js';
import { openSeekable, readHeader, validateTables } from './image.js';

/**
 * Whether the qcow2 image file at `path` looks metadata-preallocated by qemu's rule. Any image
 * that cannot be read this way (a damaged refcount table, a device) counts as not preallocated,
 * as qemu treats a failed detection.
 */
export async function detectMetadataPreallocation(path: string): Promise<boolean> {
  let file;
  try {
    file = await openSeekable(path, 'image');
  } catch {
    return false;
  }
  try {
    if (file.kind !== 'file') return false;
    let allocated: number;
    try {
      allocated = (await file.handle.stat()).blocks * 512;
    } catch (err) {
      throw fileError(err, 'inspect', path);
    }
    const header = await readHeader(file);
    validateTables(header, file.size, path, 'inspect');
    const cs = header.clusterSize;
    const real = Math.floor(allocated / cs);
    const threshold = Math.max(Math.floor((real * 10) / 9), real + 2);
    const endCluster = Math.ceil(file.size / cs);
    const perBlock = refcountsPerBlock(header.clusterBits, header.refcountOrder);
    const table = new Uint8Array(header.refcountTableClusters * cs);
    await readFully(file.handle, table, 0, table.length, header.refcountTableOffset, path);
    const tableView = new DataView(table.buffer);
    const block = new Uint8Array(cs);
    let count = 0;
    for (let index = 0; index * perBlock < endCluster && count < threshold; index++) {
      if ((index + 1) * 8 > table.length) break;
      const offset = decodeRefcountTableEntry(tableView, index * 8).blockOffset;
      if (offset === 0) continue;
      if (offset % cs !== 0) return false; // qemu's refcount read fails: detection fails
      const got = await readFully(file.handle, block, 0, cs, offset, path);
      block.fill(0, got);
      const last = Math.min(perBlock, endCluster - index * perBlock);
      for (let i = 0; i < last && count < threshold; i++) if (getRefcount(block, i, header.refcountOrder) !== 0) count++;
    }
    return count >= threshold;
  } catch {
    return false;
  } finally {
    await file.handle.close().catch(() => {});
  }
}
