// The library side of the benchmark: one conversion through the public API, from the build
// (dist/). `node bench/api.mjs convert IN OUT.qcow2 OUT.data` is convert() on a file;
// `node bench/api.mjs composed IN OUT.qcow2 OUT.data` is the pipeline a user composes:
// fs.createReadStream → createConvertStream with a function of the user's own per Block
// (here: counting the non-zero clusters), the stages and the sink the library provides.
import { createReadStream } from 'node:fs';
import { pipeline } from 'node:stream/promises';
import { convert, createConvertStream, perBlock } from '../dist/src/index.js';

const [mode, input, output, dataFile] = process.argv.slice(2);
if (mode === 'convert') {
  await convert({ input, output, dataFile, overwrite: true, sync: false });
} else if (mode === 'composed') {
  let nonZero = 0;
  const stream = createConvertStream({
    output,
    dataFile,
    overwrite: true,
    sync: false,
    stages: [perBlock((block) => void (block.zero || (nonZero += 1)))],
  });
  await pipeline(createReadStream(input, { highWaterMark: 2 * 1024 * 1024 }), stream);
  const summary = await stream.finished;
  if (summary.dataClusters !== nonZero) throw new Error(`counted ${nonZero} data clusters, the sink stored ${summary.dataClusters}`);
} else {
  throw new Error(`unknown mode ${mode}`);
}
