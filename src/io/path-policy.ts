/**
 * The path policy: which file a name stored **inside** an image may open.
 *
 * A qcow2 header can name two other files: the external data file (header extension
 * `0x44415441`) and the backing file. Both names are chosen by whoever made the image, so for
 * anyone who processes images they did not make (an upload service, a backup ingester) the names
 * are **untrusted input**. Opening them blindly turns "convert this image" into "read any file
 * the process can read, and hand it back inside the output":
 *
 * - CVE-2024-4467 (qemu): `qemu-img info` opened the data file an image named, and data-file names
 *   were parsed for `json:{…}` and protocol prefixes, so an image could make qemu open arbitrary
 *   block graphs (nbd, host files read-write).
 * - OpenStack CVE-2024-32498 (OSSA-2024-001): an uploaded qcow2 whose data file pointed at a host
 *   path (or a json: graph) made the server's conversion copy host data into the tenant's image.
 *
 * The model here:
 *
 * 1. A stored name is a **literal local file name**. `json:` is always refused; anything that looks
 *    like a protocol (`^[a-z][a-z0-9+.-]*:`) is refused unless a plain file of exactly that name
 *    exists in the image's directory (a file may legitimately be called `backup:1.raw`).
 * 2. It is resolved against the **image's own directory**. qemu resolves relative *data-file*
 *    names against its current working directory instead (backing names against the image
 *    directory); we use the image directory for both, so the result does not depend on where the
 *    command runs and the containment rule below has a fixed anchor. Only when a relative
 *    data-file name does not exist there is qemu's reading (against the working directory) tried,
 *    and it must satisfy the same containment rule.
 * 3. After resolving symbolic links (`realpath`) the target must lie **inside** that directory
 *    (itself or a subdirectory): absolute paths elsewhere, `..` escapes and symlinks pointing out
 *    are refused.
 * 4. The target must be a **regular file**: FIFOs, sockets and devices are refused (a FIFO can
 *    block forever, a device can be huge or have side effects on read).
 * 5. Names with a NUL byte, or with U+FFFD (the codec's replacement for invalid UTF-8, so the name
 *    on disk is not what we would open), are refused.
 *
 * Two ways past the policy, both explicit: the caller names the file itself (`dataFile` /
 * `backing` in the API, `--data-file` / `--backing` on the command line — that file is opened
 * as given, because the caller chose it), or the caller opts out with `allowUnsafePaths`
 * (`--allow-unsafe-paths`), which still refuses `json:`, NUL and non-regular files but allows
 * any local path.
 *
 * @module
 */

import { readlinkSync } from 'node:fs';
import { realpath, stat, type FileHandle } from 'node:fs/promises';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { PathPolicyError } from '../errors.js';
import { kindOf } from './files.js';
import { isS3Uri, parseS3Uri } from './s3-uri.js';

/** Which reference inside an image a name came from; used in messages and hints. */
export type StoredNameKind = 'data file' | 'backing file' | 'extent file' | 'parent disk';

/** Options of {@link resolveStoredName}. */
export interface PathPolicyOptions {
  /**
   * Allow any local path (absolute, `..`, symlinks leaving the directory). `json:` names, NUL
   * bytes and non-regular files are refused even then. Default false.
   */
  allowUnsafePaths?: boolean;
}

/** Where each kind of name is stored, for error context. */
const FIELDS: Record<StoredNameKind, string> = {
  'data file': 'data file name',
  'backing file': 'backing file name',
  'extent file': 'VMDK descriptor extent name',
  'parent disk': 'VHD/VHDX parent locator',
};

const PROTOCOL_PREFIX = /^[a-z][a-z0-9+.-]*:/i;

function hintFor(kind: StoredNameKind): string {
  if (kind === 'extent file') return 'If you trust this image, opt out of the check with --allow-unsafe-paths (API: allowUnsafePaths)';
  if (kind === 'parent disk') kind = 'backing file';
  const flag = kind === 'data file' ? '--data-file' : '--backing';
  const api = kind === 'data file' ? 'dataFile' : 'backing';
  return `If you trust this image, pass the ${kind} explicitly with ${flag} PATH (API: ${api}), or opt out of the check with --allow-unsafe-paths (API: allowUnsafePaths)`;
}

/**
 * Resolves a name stored in the image at `imagePath` to the path of the file it may open, or
 * throws a {@link PathPolicyError} (code `QCOW_ERR_PATH_POLICY`) saying why not.
 *
 * The returned path is the real path (symlinks resolved), so what is checked is what is opened.
 */
export async function resolveStoredName(
  imagePath: string,
  storedName: string,
  kind: StoredNameKind,
  options: PathPolicyOptions = {},
): Promise<string> {
  const refuse = (why: string): never => {
    throw new PathPolicyError(`Refusing the ${kind} named in '${imagePath}': ${JSON.stringify(storedName)} ${why}`, storedName, {
      hint: hintFor(kind),
      structure: 'header',
      field: FIELDS[kind],
    });
  };

  if (storedName.length === 0) refuse('is empty');
  if (storedName.includes('\0')) refuse('contains a NUL byte');
  if (storedName.includes('\uFFFD')) refuse('is not valid UTF-8');
  if (/^json:/i.test(storedName)) refuse('is a json: block-graph description, which is never opened');
  if (isS3Uri(imagePath)) return resolveStoredKey(imagePath, storedName, options, refuse);

  const imageDir = await realDirectory(imagePath);
  const candidate = resolve(imageDir, storedName);
  if (PROTOCOL_PREFIX.test(storedName) && !(dirname(candidate) === imageDir && (await isRegularFile(candidate)))) {
    refuse('looks like a protocol (name:…) rather than a plain file in the image directory');
  }
  if (!options.allowUnsafePaths) {
    if (isAbsolute(storedName) && !isInside(imageDir, candidate)) refuse(`is an absolute path outside the image directory '${imageDir}'`);
    if (!isInside(imageDir, candidate)) refuse(`escapes the image directory '${imageDir}' with '..'`);
  }

  let found = await realpathOf(candidate);
  let lookedFor = `'${candidate}'`;
  if (found.code === 'ENOENT' && kind === 'data file' && !isAbsolute(storedName)) {
    // qemu resolves a relative data-file name against its working directory, so images made
    // from another directory store names like 'out/disk.data'. Accept that reading too, but
    // only where it still lands inside the image directory.
    const fromCwd = resolve(storedName);
    if (fromCwd !== candidate && (options.allowUnsafePaths || isInside(imageDir, fromCwd))) {
      found = await realpathOf(fromCwd);
      lookedFor += ` and '${fromCwd}'`;
    } else if (fromCwd !== candidate) {
      // Read qemu's way the name may well name a file beside the image directory, not in it:
      // say why that is not opened. (Whether it exists is not said: the name is the image's.)
      refuse(
        `does not exist in the image directory (looked for '${candidate}'); read from the working directory as qemu reads it, it names '${fromCwd}', outside the image directory '${imageDir}', which the path policy refuses`,
      );
    }
  }
  if (found.real === undefined) {
    return refuse(found.code === 'ENOENT' ? `does not exist (looked for ${lookedFor})` : `cannot be resolved (${found.code})`);
  }
  const real = found.real;
  if (!options.allowUnsafePaths && !isInside(imageDir, real)) {
    refuse(`leads through a symbolic link to '${real}', outside the image directory '${imageDir}'`);
  }
  const stats = await stat(real).catch(() => undefined);
  if (!stats) return refuse(`cannot be inspected ('${real}')`);
  const fileKind = kindOf(stats);
  if (fileKind !== 'file') refuse(`is not a regular file (it is a ${fileKind === 'pipe' ? 'FIFO' : fileKind})`);
  return real;
}

/**
 * The same rules for an image that is an object (`s3://bucket/dir/disk.qcow2`): a stored name is
 * a key relative to the image's prefix (`disk.data` → `s3://bucket/dir/disk.data`), never a
 * local file, another bucket or a URI. Absolute names and `..` leaving the prefix are refused
 * (with allowUnsafePaths they may reach elsewhere in the same bucket, never outside it); the
 * object must exist. There are no links to follow and every object is a plain byte string.
 */
async function resolveStoredKey(imageUri: string, storedName: string, options: PathPolicyOptions, refuse: (why: string) => never): Promise<string> {
  const { bucket, key } = parseS3Uri(imageUri);
  const prefix = key.includes('/') ? key.slice(0, key.lastIndexOf('/') + 1) : '';
  const where = `s3://${bucket}/${prefix}`;
  const absolute = storedName.startsWith('/');
  const parts: string[] = [];
  for (const part of `${absolute ? '' : prefix}${storedName}`.split('/')) {
    if (part === '' || part === '.') continue;
    if (part !== '..') parts.push(part);
    else if (parts.pop() === undefined) return refuse(`leaves the bucket '${bucket}' with '..'`);
  }
  const candidate = parts.join('/');
  const escaped = !candidate.startsWith(prefix);
  const uri = `s3://${bucket}/${candidate}`;
  const { headObject } = await import('./s3.js');
  // As for files: `name:…` is taken only as an existing object of exactly that name beside the image.
  if (PROTOCOL_PREFIX.test(storedName) && (storedName.includes('/') || (await headObject(uri)) === undefined)) {
    refuse(`looks like a protocol (name:…) rather than a plain object beside the image under '${where}'`);
  }
  if (!options.allowUnsafePaths) {
    if (absolute) refuse(`is an absolute path outside the image's prefix '${where}'`);
    if (escaped) refuse(`escapes the image's prefix '${where}' with '..'`);
  }
  if (candidate === '' || (await headObject(uri)) === undefined) refuse(`does not exist (looked for '${uri}')`);
  return uri;
}

async function realpathOf(path: string): Promise<{ real?: string; code?: string }> {
  try {
    return { real: await realpath(path) };
  } catch (err) {
    return { code: (err as NodeJS.ErrnoException).code ?? String(err) };
  }
}

/** The real path of the directory holding `imagePath` (so comparisons survive symlinked dirs). */
async function realDirectory(imagePath: string): Promise<string> {
  const dir = dirname(resolve(imagePath));
  try {
    return await realpath(dir);
  } catch {
    return dir;
  }
}

function isInside(dir: string, path: string): boolean {
  const rel = relative(dir, path);
  return rel === '' || (!rel.startsWith(`..${sep}`) && rel !== '..' && !isAbsolute(rel));
}

async function isRegularFile(path: string): Promise<boolean> {
  try {
    return (await stat(path)).isFile();
  } catch {
    return false;
  }
}

/**
 * Checks what was opened for a name the policy resolved (`resolved`, a real path that passed
 * every rule): the descriptor's own path must still be `resolved`, and it must be a regular
 * file. Between the checks above and the open, a directory on the way or the file itself can
 * be swapped for a symbolic link to a file outside, a directory, or a device; the open then
 * follows it, and only the descriptor tells. Linux names each descriptor's file in
 * /proc/self/fd; elsewhere the device and inode of the path, looked up again, must match.
 */
export async function confirmOpened(handle: FileHandle, resolved: string, kind: StoredNameKind): Promise<void> {
  const refuse = (why: string): never => {
    throw new PathPolicyError(`Refusing the ${kind} '${resolved}': ${why}`, resolved, { hint: hintFor(kind) });
  };
  const stats = await handle.stat();
  const fileKind = kindOf(stats);
  if (fileKind !== 'file') refuse(`what was opened is not a regular file (it is a ${fileKind === 'pipe' ? 'FIFO' : fileKind}); was the path changed while it was opened?`);
  let opened: string | undefined;
  try {
    opened = readlinkSync(`/proc/self/fd/${handle.fd}`);
  } catch {
    opened = undefined;
  }
  if (opened !== undefined) {
    if (opened !== resolved) refuse(`what was opened is '${opened}': the path was changed while it was opened`);
    return;
  }
  const now = await stat(resolved).catch(() => undefined);
  if (!now || now.dev !== stats.dev || now.ino !== stats.ino) refuse('the path was changed while it was opened');
}

/**
 * Whether our readers will find the data file now at `actualPath` through the name stored in
 * the image at `imagePath` (from the image's directory, or qemu's way from this working
 * directory) and let it pass the containment rule: said at creation, so an image is not
 * written that our own readers then refuse. Symbolic links are not followed here.
 */
export function storedNameFindsFile(imagePath: string, storedName: string, actualPath: string): boolean {
  const imageDir = dirname(resolve(imagePath));
  const actual = resolve(actualPath);
  if (!isInside(imageDir, actual)) return false;
  return resolve(imageDir, storedName) === actual || (!isAbsolute(storedName) && resolve(storedName) === actual);
}
