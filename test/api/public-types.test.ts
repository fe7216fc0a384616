/**
 * The public typings as a consumer meets them: test/api/fixtures/public-types.ts switches on
 * every error code (narrowing each case to its class, with an exhaustive `never`), iterates an
 * export's chunks and opens an image with `await using`. It is type-checked here with the
 * repository's TypeScript and compiler options, then run on real errors and a real image.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { constants as osConstants } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import * as api from '../../src/index.js';
import { tempDir } from '../helpers/qemu.js';
import { writeRawImage } from '../helpers/images.js';
import { leakedSince, openDescriptors } from '../helpers/descriptors.js';
import { codesMatchClasses, explain, firstBytes } from './fixtures/public-types.js';

const root = fileURLToPath(new URL('../..', import.meta.url));
const fixture = join(root, 'test', 'api', 'fixtures', 'public-types.ts');

test('the consumer fixture type-checks: codes narrow, FileError.errno is a number, chunks are Buffers, images are AsyncDisposable', () => {
  const config = ts.readConfigFile(join(root, 'tsconfig.json'), (path) => ts.sys.readFile(path));
  const parsed = ts.parseJsonConfigFileContent(config.config, ts.sys, root);
  const program = ts.createProgram([fixture], { ...parsed.options, noEmit: true });
  const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => {
    const where = d.file && d.start !== undefined ? `${d.file.fileName}:${d.file.getLineAndCharacterOfPosition(d.start).line + 1}: ` : '';
    return `${where}${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`;
  });
  assert.deepEqual(diagnostics, []);
  assert.equal(codesMatchClasses, true);
});

test('the fixture handles an error of every exported class, and a real FileError carries Node\'s errno and code', async (t) => {
  const classes = Object.entries(api as Record<string, unknown>).filter(
    (entry): entry is [string, { CODE: string; prototype: object }] => typeof entry[1] === 'function' && 'CODE' in entry[1] && typeof entry[1].CODE === 'string',
  );
  assert.ok(classes.length >= 20, 'every error class is exported');
  for (const [name, cls] of classes) {
    // A bare instance of the class: explain() reaches its case by code (its default throws).
    const instance = Object.assign(Object.create(cls.prototype) as object, { code: cls.CODE, features: [], packages: [] });
    assert.doesNotThrow(() => explain(instance), name);
    assert.doesNotMatch(explain(instance), /^not ours/, name);
  }

  const dir = tempDir(t);
  const missing = join(dir, 'missing.qcow2');
  const err = await api.openImage(missing).then(() => undefined, (e: unknown) => e);
  assert.ok(err instanceof api.FileError, String(err));
  assert.equal(err.systemCode, 'ENOENT');
  assert.equal(err.errno, -osConstants.errno.ENOENT);
  assert.equal(err.syscall, 'open');
  assert.equal(explain(err), `file ${missing}: ENOENT ${-osConstants.errno.ENOENT} open`);
});

test('await using closes the image; an export yields every byte', async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, 'disk.raw');
  writeRawImage(raw, 1 << 20, [{ offset: 0, length: 300_000, kind: 'random' }]);
  await api.convert({ input: raw, output: join(dir, 'disk.qcow2') });
  const before = openDescriptors();
  assert.equal(await firstBytes(join(dir, 'disk.qcow2')), 1 << 20);
  assert.deepEqual(leakedSince(before), [], 'the image was closed at the end of the await using block');
});

