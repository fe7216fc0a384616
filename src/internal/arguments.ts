/**
 * Checks of what a caller hands the public API, before anything is opened: a JavaScript caller
 * (or a cast) can pass anything, and the answer must be an InvalidArgumentError that shows the
 * value meaningfully, never a TypeError from deep inside or "'[object Object]'".
 */

import { InvalidArgumentError } from '../errors.js';

/**
 * A user value as a message shows it: strings quoted, numbers and other primitives as written,
 * streams and other objects by what they are (`a Writable stream`, `a Uint8Array of 5 bytes`).
 */
export function describeValue(value: unknown): string {
  if (typeof value === 'string') return `'${value}'`;
  if (value === null || value === undefined || typeof value === 'number' || typeof value === 'boolean') return String(value);
  if (typeof value === 'bigint') return `${value}n`;
  if (typeof value === 'symbol') return value.toString();
  if (typeof value === 'function') return 'a function';
  if (value instanceof Uint8Array) return `a ${value.constructor.name} of ${value.length} bytes`;
  if (Array.isArray(value)) return `an array of ${value.length}`;
  const object = value as { pipe?: unknown; write?: unknown; read?: unknown; constructor?: { name?: unknown } };
  if (typeof object.pipe === 'function' || typeof object.write === 'function') {
    const readable = typeof object.read === 'function';
    const writable = typeof object.write === 'function';
    return `a ${readable && writable ? 'Duplex' : writable ? 'Writable' : 'Readable'} stream`;
  }
  const name = typeof object.constructor?.name === 'string' ? object.constructor.name : '';
  return name && name !== 'Object' ? `a ${name}` : 'an object';
}

/** Throws unless `options` is an object (or undefined, when the argument is optional). */
export function checkOptionsObject(options: unknown, call: string, required = true): void {
  if (options === undefined && !required) return;
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    throw new InvalidArgumentError(`${call} takes an options object, not ${describeValue(options)}`);
  }
}

/** Throws unless `value` is a non-empty string (a path, a URI). */
export function checkPath(value: unknown, what: string): asserts value is string {
  if (typeof value !== 'string' || value === '') {
    throw new InvalidArgumentError(`The ${what} must be a path (a non-empty string), not ${describeValue(value)}`);
  }
}

/** Whether `value` can be written to like a Node Writable (what an output stream must be). */
export function isWritableLike(value: unknown): boolean {
  return typeof value === 'object' && value !== null && typeof (value as { write?: unknown }).write === 'function' && typeof (value as { on?: unknown }).on === 'function';
}

/** Throws unless `value` is undefined or an AbortSignal (anything with `aborted` and `addEventListener`). */
export function checkSignal(value: unknown): void {
  if (value === undefined) return;
  const signal = value as { aborted?: unknown; addEventListener?: unknown };
  if (typeof value !== 'object' || value === null || typeof signal.aborted !== 'boolean' || typeof signal.addEventListener !== 'function') {
    throw new InvalidArgumentError(`signal must be an AbortSignal, not ${describeValue(value)}`);
  }
}

/** Throws unless each named option is undefined or a function (the callbacks). */
export function checkCallbacks(options: object, names: readonly string[]): void {
  for (const name of names) {
    const value = (options as Record<string, unknown>)[name];
    if (value !== undefined && typeof value !== 'function') throw new InvalidArgumentError(`${name} must be a function, not ${describeValue(value)}`);
  }
}

/** Throws unless `value` looks like an opened DiskImage (what openImage/openDisk return). */
export function checkDiskImage(value: unknown, call: string): void {
  const image = value as { readInto?: unknown; extents?: unknown; virtualSize?: unknown } | null;
  if (typeof value !== 'object' || image === null || typeof image.readInto !== 'function' || typeof image.extents !== 'function' || typeof image.virtualSize !== 'number') {
    throw new InvalidArgumentError(`${call} takes an image opened with openImage() or openDisk(), not ${describeValue(value)}`);
  }
}
