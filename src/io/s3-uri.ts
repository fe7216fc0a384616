/**
 * `s3://bucket/key` names, recognised wherever a path is accepted. Parsing only: nothing here
 * loads the AWS SDK, so the core can ask "is this an object?" for free.
 */

import { InvalidArgumentError } from '../errors.js';

/** A parsed `s3://bucket/key`. */
export interface S3Location {
  bucket: string;
  key: string;
}

/** Whether `name` is meant as an object (`s3://…`), valid or not. */
export function isS3Uri(name: unknown): name is string {
  return typeof name === 'string' && name.startsWith('s3://');
}

/**
 * Splits `s3://bucket/key`. Bucket names follow S3's rules (3–63 of `a-z 0-9 . -`); the key is
 * any non-empty UTF-8 text up to 1024 bytes that does not end in `/` (that names a "folder").
 */
export function parseS3Uri(uri: string): S3Location {
  const rest = uri.slice('s3://'.length);
  const slash = rest.indexOf('/');
  const bucket = slash < 0 ? rest : rest.slice(0, slash);
  const key = slash < 0 ? '' : rest.slice(slash + 1);
  if (bucket.includes('@')) {
    // Not echoed: what precedes '@' may be a key pair someone pasted into the URI.
    throw new InvalidArgumentError(`'s3://***@${bucket.slice(bucket.lastIndexOf('@') + 1)}/…' carries credentials, which s3:// names never do`, {
      hint: 'Credentials come from the AWS SDK chain: AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, shared config files, instance roles',
    });
  }
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) {
    throw new InvalidArgumentError(`'${uri}' does not name a bucket: bucket names are 3-63 characters of a-z, 0-9, '.' and '-'`);
  }
  if (key === '' || key.endsWith('/') || Buffer.byteLength(key) > 1024 || key.includes('\0')) {
    throw new InvalidArgumentError(`'${uri}' does not name an object: expected s3://${bucket}/KEY, a key of 1-1024 bytes not ending in '/'`);
  }
  return { bucket, key };
}

/** The last segment of the key: the data-file name stored in a metadata object by default. */
export function keyBaseName(uri: string): string {
  const { key } = parseS3Uri(uri);
  return key.slice(key.lastIndexOf('/') + 1);
}
