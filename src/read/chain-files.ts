/** The files an open image reads: each layer of its chain and each layer's data file. */

import type { RunFile } from '../io/same-file.js';
import type { DiskImage } from './image.js';

export function chainFiles(image: DiskImage, role = 'image'): RunFile[] {
  const files: RunFile[] = [];
  for (let layer: DiskImage | undefined = image, depth = 0; layer; layer = layer.backing, depth++) {
    const name = depth === 0 ? role : 'backing file';
    files.push({ role: name, path: layer.path });
    if (layer.dataFilePath !== undefined) files.push({ role: `data file of the ${name}`, path: layer.dataFilePath });
  }
  return files;
}
