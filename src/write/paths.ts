/**
 * The data file's default path and default stored name, and the warning for a stored name our
 * readers will refuse. (Whether two names denote the same file is src/io/same-file.ts.)
 */

import { dirname, format, isAbsolute, parse, relative, resolve, sep } from 'node:path';
import type { Writable } from 'node:stream';
import { storedNameFindsFile } from '../io/path-policy.js';
import { isS3Uri, keyBaseName } from '../io/s3-uri.js';

/** `disk.qcow2` → `disk.data`, `img/disk` → `img/disk.data` (directory kept as given). */
export function defaultDataFilePath(output: string): string {
  const parsed = parse(output);
  return format({ dir: parsed.dir, name: parsed.name, ext: '.data' });
}

/** Whether `target` is a file path on this machine (not '-', an object or a stream). */
function isLocalPath(target: unknown): target is string {
  return typeof target === 'string' && target !== '-' && !isS3Uri(target);
}

/**
 * The data-file name stored in the header when the caller gives none. The portable choice: the
 * data file's path relative to the image's directory when it lies there or below (the pair keeps
 * working when both move together, and our readers resolve it from the image's directory),
 * its absolute path otherwise (qemu then finds it from any working directory; our readers
 * refuse it, which {@link dataFileNameWarning} says). An object's name is its key's last
 * segment (the two objects are fetched side by side); with the metadata on standard output or
 * a stream there is no image directory, and the path is stored as given.
 */
export function defaultDataFileName(output: string | Writable, dataFile: string): string {
  if (isS3Uri(dataFile)) return keyBaseName(dataFile);
  if (!isLocalPath(output)) return dataFile;
  const fromImage = relative(dirname(resolve(output)), resolve(dataFile));
  const inside = fromImage !== '' && fromImage !== '..' && !fromImage.startsWith(`..${sep}`) && !isAbsolute(fromImage);
  return inside ? fromImage : resolve(dataFile);
}

/**
 * The warning for a stored data-file name our readers will not follow to the data file
 * (src/io/path-policy.ts): it leads elsewhere or outside the image's directory. Said at
 * creation, so nobody finds out only when the image is refused. Undefined when the name is
 * fine, or when either side is not a local file (nothing to check).
 */
export function dataFileNameWarning(output: string | Writable, dataFileName: string, dataFile: string | Writable): string | undefined {
  if (!isLocalPath(output) || !isLocalPath(dataFile) || storedNameFindsFile(output, dataFileName, dataFile)) return undefined;
  return (
    `The data-file name '${dataFileName}' stored in '${output}' does not lead from the image's directory to the data file, or leads outside it: qemu may open it (an absolute name from anywhere, a relative one from the right working directory), ` +
    `but qcow2-stream's readers refuse it unless given --data-file (API: dataFile) or --allow-unsafe-paths (API: allowUnsafePaths). Keep the data file in the image's directory or below it`
  );
}
