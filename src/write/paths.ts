/**
 * The default data-file name. (Whether two names denote the same file is src/io/same-file.ts.)
 */

import { format, parse } from 'node:path';

/** `disk.qcow2` → `disk.data`, `img/disk` → `img/disk.data` (directory kept as given). */
export function defaultDataFilePath(output: string): string {
  const parsed = parse(output);
  return format({ dir: parsed.dir, name: parsed.name, ext: '.data' });
}
