#!/usr/bin/env node
// node read_car.mjs FILE.car → "roots <cid>..." then "<cid> <len>" per block; exits 1 if a
// block's bytes do not hash to its CID (sha2-256 and identity only).
import { readFile } from 'node:fs/promises'
import { CarReader } from '@ipld/car'
import { sha256 } from 'multiformats/hashes/sha2'
import { equals } from 'uint8arrays/equals'

const reader = await CarReader.fromBytes(await readFile(process.argv[2]))
process.stdout.write(`roots ${(await reader.getRoots()).map(String).join(' ')}\n`)
for await (const { cid, bytes } of reader.blocks()) {
  const ok = cid.multihash.code === 0x12 ? equals((await sha256.digest(bytes)).digest, cid.multihash.digest) : cid.multihash.code === 0 && equals(cid.multihash.digest, bytes)
  if (!ok) { process.stderr.write(`block ${cid} does not verify\n`); process.exit(1) }
  process.stdout.write(`${cid} ${bytes.length}\n`)
}
