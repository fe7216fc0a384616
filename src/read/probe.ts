/**
 * Probing: which format a file is, from its first bytes.
 */

import { QCOW2_MAGIC } from '../format/index.js';
import { readFully } from '../io/files.js';
import { openSeekable } from './base-image.js';
import type { ImageFormat } from './image.js';

/** `qcow2` when the file starts with the qcow2 magic, else `raw`. */
export async function probeFormat(path: string): Promise<ImageFormat> {
  const file = await openSeekable(path, 'image');
  try {
    const head = new Uint8Array(4);
    const got = await readFully(file.handle, head, 0, 4, 0, path);
    return got === 4 && new DataView(head.buffer).getUint32(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
  } finally {
    await file.handle.close().catch(() => {});
  }
}
