import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { createProgress } from '../../src/cli/progress.js';

/** A fake terminal: a stream that says it is a TTY and records what is drawn. */
function fakeTty(isTTY: boolean): { stream: NodeJS.WriteStream; text: () => string } {
  const stream = new PassThrough() as unknown as NodeJS.WriteStream & PassThrough;
  let text = '';
  stream.on('data', (chunk: Buffer) => (text += chunk.toString('utf8')));
  Object.assign(stream, { isTTY, columns: 120, cursorTo: () => true, clearLine: () => true, moveCursor: () => true });
  return { stream, text: () => text.replace(/\x1b\[[0-9;?]*[a-zA-Z]/g, '') };
}

test('draws bytes, percentage and throughput on a terminal', async () => {
  const tty = fakeTty(true);
  const progress = await createProgress({ label: 'convert', stream: tty.stream });
  progress.update({ bytesDone: 0, bytesTotal: 2 * 2 ** 30 });
  progress.update({ bytesDone: 2 * 2 ** 30, bytesTotal: 2 * 2 ** 30 });
  progress.stop();
  assert.match(tty.text(), /convert \[.*\] 100% 2\.00 GiB\/2\.00 GiB .*\/s/);
});

test('shows bytes and throughput without a percentage when the total is unknown', async () => {
  const tty = fakeTty(true);
  const progress = await createProgress({ label: 'convert', stream: tty.stream });
  progress.update({ bytesDone: 5 * 2 ** 20 });
  progress.stop();
  assert.match(tty.text(), /convert 5\.00 MiB .*\/s/);
  assert.doesNotMatch(tty.text(), /%/);
});

test('draws nothing when stderr is not a terminal, or with --quiet', async () => {
  for (const [isTTY, quiet] of [[false, false], [true, true]] as const) {
    const tty = fakeTty(isTTY);
    const progress = await createProgress({ label: 'export', stream: tty.stream, quiet });
    progress.update({ bytesDone: 10, bytesTotal: 100 });
    progress.stop();
    assert.equal(tty.text(), '');
  }
});
