/**
 * Probing: which format a file is, from its first bytes (and its last sector), the one place
 * that decides it. Like qemu's probes, each format is recognised by its magic and, where the
 * magic alone is weak, by structure (a VMDK text descriptor's `version=` line, a fixed VHD's
 * footer checksum); anything else is raw.
 *
 * Formats this library recognises but does not read (vdi, qed, parallels, luks, dmg…) are
 * refused by name ({@link UnsupportedFormatError}) instead of being taken as raw: a container
 * read as a raw disk is silently wrong data. A file probed as raw whose name says it is
 * something else gets a warning.
 */

import { UnsupportedFormatError } from '../errors.js';
import { QCOW2_MAGIC } from '../format/index.js';
import { readFully } from '../io/files.js';
import { openSeekable } from './base-image.js';
import type { ImageFormat } from './image.js';

/** Bytes of the start of a file the probe looks at (qemu looks at 2 KiB at most). */
export const PROBE_HEAD_BYTES = 4096;
/** Bytes at the end of a file the probe looks at: a VHD footer, a DMG trailer. */
export const PROBE_TAIL_BYTES = 512;

/** The formats the readers open. */
const READABLE: ReadonlySet<string> = new Set<ImageFormat>(['qcow2', 'raw', 'vpc', 'vmdk', 'vhdx']);

/** A format the probe can name: one the readers open, or one only recognised. */
export type DetectedFormat = ImageFormat | 'qcow' | 'qed' | 'vdi' | 'parallels' | 'luks' | 'dmg' | 'cloop' | 'bochs';

const ascii = (text: string) => Uint8Array.from(text, (c) => c.charCodeAt(0));

/** Magic strings at offset 0, as qemu's probes check them. */
const HEAD_MAGICS: ReadonlyArray<readonly [DetectedFormat, Uint8Array]> = [
  ['vmdk', ascii('KDMV')],
  ['vmdk', ascii('COWD')],
  ['vpc', ascii('conectix')],
  ['vhdx', ascii('vhdxfile')],
  ['qed', ascii('QED\0')],
  ['parallels', ascii('WithoutFreeSpace')],
  ['parallels', ascii('WithouFreSpacExt')],
  ['luks', Uint8Array.of(0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe)],
  ['bochs', ascii('Bochs Virtual HD Image')],
  ['cloop', ascii('#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n')],
];

/** VDI: the signature 0xbeda107f (little-endian) at byte 64. */
const VDI_SIGNATURE_OFFSET = 64;
const VDI_SIGNATURE = 0xbeda107f;
/** DMG: the `koly` trailer in the last 512 bytes. */
const DMG_KOLY = 0x6b6f6c79;

/** Human names for messages. */
const FORMAT_NAMES: Record<DetectedFormat, string> = {
  qcow2: 'qcow2',
  raw: 'raw',
  vmdk: 'VMDK',
  vpc: 'VHD (vpc)',
  vhdx: 'VHDX',
  qcow: 'qcow (version 1)',
  qed: 'QED',
  vdi: 'VirtualBox VDI',
  parallels: 'Parallels',
  luks: 'LUKS (encrypted)',
  dmg: 'Apple DMG',
  cloop: 'cloop',
  bochs: 'Bochs',
};

/** The human name of a format, for messages. */
export function formatName(format: DetectedFormat): string {
  return FORMAT_NAMES[format];
}

function startsWith(bytes: Uint8Array, magic: Uint8Array, at = 0): boolean {
  if (bytes.length < at + magic.length) return false;
  for (let i = 0; i < magic.length; i++) if (bytes[at + i] !== magic[i]) return false;
  return true;
}

/**
 * The format of a file from its first bytes (`head`, up to {@link PROBE_HEAD_BYTES}) and, for
 * a file, its last 512 bytes (`tail`; undefined for a stream, whose end is not known yet).
 * Never reads anything; a pure function of the bytes.
 */
export function detectFormat(head: Uint8Array, tail?: Uint8Array): DetectedFormat {
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  if (head.length >= 8 && view.getUint32(0) === QCOW2_MAGIC) {
    // qemu's qcow probe takes version 1, qcow2's takes 2 and above (an unknown version is then
    // refused by the qcow2 reader, by version).
    return view.getUint32(4) === 1 ? 'qcow' : 'qcow2';
  }
  for (const [format, magic] of HEAD_MAGICS) if (startsWith(head, magic)) return format;
  if (head.length >= VDI_SIGNATURE_OFFSET + 4 && view.getUint32(VDI_SIGNATURE_OFFSET, true) === VDI_SIGNATURE) return 'vdi';
  if (isVmdkDescriptor(head)) return 'vmdk';
  if (tail && tail.length === PROBE_TAIL_BYTES) {
    if (isVhdFooter(tail)) return 'vpc';
    if (new DataView(tail.buffer, tail.byteOffset, tail.byteLength).getUint32(0) === DMG_KOLY) return 'dmg';
  }
  return 'raw';
}

/**
 * qemu's text-descriptor probe (vmdk_probe): comment lines (`#…`) and blank lines, then a
 * `version=1`, `version=2` or `version=3` line, with LF or CRLF endings. Anything else first
 * means not a descriptor.
 */
function isVmdkDescriptor(head: Uint8Array): boolean {
  let p = 0;
  const end = head.length;
  while (p < end) {
    if (head[p] === 0x23 /* # */) {
      while (p < end && head[p] !== 0x0a) p++;
      p++;
      continue;
    }
    if (head[p] === 0x20 || head[p] === 0x0a || head[p] === 0x0d) {
      while (p < end && head[p] === 0x20) p++;
      if (p < end && head[p] === 0x0d) p++;
      if (p === end || head[p] !== 0x0a) return false;
      p++;
      continue;
    }
    for (const version of ['1', '2', '3']) {
      if (startsWith(head, ascii(`version=${version}\n`), p) || startsWith(head, ascii(`version=${version}\r\n`), p)) return true;
    }
    return false;
  }
  return false;
}

/**
 * A VHD footer (the last sector of a fixed VHD, whose start is guest data): the `conectix`
 * cookie, a valid checksum (the one's complement of the byte sum, checksum field excluded) and
 * a known disk type. The checksum is what keeps a raw disk that happens to end in the cookie
 * from being taken for a VHD.
 */
export function isVhdFooter(sector: Uint8Array): boolean {
  if (sector.length < 512 || !startsWith(sector, ascii('conectix'))) return false;
  const view = new DataView(sector.buffer, sector.byteOffset, 512);
  let sum = 0;
  for (let i = 0; i < 512; i++) if (i < 64 || i >= 68) sum += sector[i]!;
  if ((~sum >>> 0) !== view.getUint32(64)) return false;
  const diskType = view.getUint32(60);
  return diskType === 2 || diskType === 3 || diskType === 4;
}

/** File-name endings that name a format, for the "probed as raw" warning. */
const NAME_HINTS: ReadonlyArray<readonly [RegExp, string]> = [
  [/\.qcow2?$/i, 'qcow2'],
  [/\.vmdk$/i, 'VMDK'],
  [/\.(vhd|vpc)$/i, 'VHD'],
  [/\.vhdx$/i, 'VHDX'],
  [/\.vdi$/i, 'VDI'],
  [/\.qed$/i, 'QED'],
  [/\.(hdd|hds)$/i, 'Parallels'],
  [/\.dmg$/i, 'DMG'],
  [/\.ova$/i, 'OVA (a tar archive holding a VMDK)'],
];

/** The warning for a file probed as raw whose name says otherwise, or undefined. */
export function rawNameWarning(path: string): string | undefined {
  for (const [pattern, name] of NAME_HINTS) {
    if (pattern.test(path)) {
      return `'${path}' is named like a ${name} image but has no ${name} structure; reading it as raw (pass -f to choose the format)`;
    }
  }
  return undefined;
}

/** Throws UnsupportedFormatError unless a reader opens `format`. */
export function assertReadable(format: DetectedFormat, path: string): asserts format is ImageFormat {
  if (READABLE.has(format)) return;
  throw new UnsupportedFormatError(`'${path}' is a ${formatName(format)} image, which qcow2-stream does not read`, format, {
    hint: `Convert it first, e.g. qemu-img convert -f ${format} -O raw '${path}' disk.raw`,
  });
}

/** Reads the probe's bytes of a seekable file: its head and its last sector. */
export async function probeFile(path: string): Promise<DetectedFormat> {
  const file = await openSeekable(path, 'image');
  try {
    const head = new Uint8Array(Math.min(PROBE_HEAD_BYTES, file.size));
    const got = await readFully(file.handle, head, 0, head.length, 0, path);
    let tail: Uint8Array | undefined;
    if (file.size >= PROBE_TAIL_BYTES * 2) {
      tail = new Uint8Array(PROBE_TAIL_BYTES);
      if ((await readFully(file.handle, tail, 0, PROBE_TAIL_BYTES, file.size - PROBE_TAIL_BYTES, path)) !== PROBE_TAIL_BYTES) tail = undefined;
    }
    return detectFormat(head.subarray(0, got), tail);
  } finally {
    await file.handle.close().catch(() => {});
  }
}

/** Options of {@link probeFormat}. */
export interface ProbeFormatOptions {
  /** Called with the warning for a file probed as raw whose name says it is an image. */
  onWarning?: ((message: string) => void) | undefined;
}

/**
 * The format of the file at `path`, among those the readers open. A recognised format no
 * reader opens is refused by name (UnsupportedFormatError); a file probed as raw whose name
 * says otherwise is reported through `onWarning`.
 */
export async function probeFormat(path: string, options: ProbeFormatOptions = {}): Promise<ImageFormat> {
  const { onWarning } = options;
  const format = await probeFile(path);
  assertReadable(format, path);
  if (format === 'raw') {
    const warning = rawNameWarning(path);
    if (warning !== undefined) onWarning?.(warning);
  }
  return format;
}
