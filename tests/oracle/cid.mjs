#!/usr/bin/env node
// CID oracle for mxcas integration tests.
//
//   node cid.mjs FILE...          prints "<cid> <path>" per file
//   node cid.mjs --blocks FILE    prints "<cid> <len> <hex|->" per block written,
//                                 in write order (the root is the last line)
//
// The CID is the root CID computed by ipfs-unixfs-importer with
// { profile: 'unixfs-v1-2025' } (IPIP-499: CIDv1, raw leaves, 1 MiB chunks,
// 1024 links per node, balanced layout). Files are streamed from disk and
// blocks are never retained, so arbitrarily large files can be hashed.

import { createReadStream } from 'node:fs'
import { stat } from 'node:fs/promises'
import { importFile } from 'ipfs-unixfs-importer'

const DAG_PB = 0x70
const USAGE = 'usage: node cid.mjs FILE...\n       node cid.mjs --blocks FILE\n'

// Blockstore that keeps nothing: the importer hashes
// each block itself (utils/persist.js) and only ever calls put().
function discardingBlockstore (onBlock) {
  return {
    put (cid, bytes) {
      onBlock?.(cid, bytes)
      return cid
    }
  }
}

async function rootCid (path, onBlock) {
  const st = await stat(path)
  if (!st.isFile()) {
    throw new Error('not a regular file')
  }
  const content = createReadStream(path, { highWaterMark: 1024 * 1024 })
  const entry = await importFile({ content }, discardingBlockstore(onBlock), {
    profile: 'unixfs-v1-2025'
  })
  return entry.cid
}

async function main (argv) {
  let blocks = false
  const files = []
  let endOfOpts = false
  for (const arg of argv) {
    if (!endOfOpts && arg === '--') {
      endOfOpts = true
    } else if (!endOfOpts && arg === '--blocks') {
      blocks = true
    } else if (!endOfOpts && (arg === '-h' || arg === '--help')) {
      process.stdout.write(USAGE)
      return 0
    } else if (!endOfOpts && arg.startsWith('-') && arg !== '-') {
      process.stderr.write(`cid.mjs: unknown option ${arg}\n${USAGE}`)
      return 2
    } else {
      files.push(arg)
    }
  }
  if (files.length === 0 || (blocks && files.length !== 1)) {
    process.stderr.write(USAGE)
    return 2
  }

  for (const path of files) {
    try {
      if (blocks) {
        await rootCid(path, (cid, bytes) => {
          const hex = cid.code === DAG_PB ? Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex') : '-'
          process.stdout.write(`${cid.toString()} ${bytes.byteLength} ${hex}\n`)
        })
      } else {
        const cid = await rootCid(path)
        process.stdout.write(`${cid.toString()} ${path}\n`)
      }
    } catch (err) {
      process.stderr.write(`cid.mjs: error: ${path}: ${err?.message ?? err}\n`)
      return 1
    }
  }
  return 0
}

process.exitCode = await main(process.argv.slice(2))
