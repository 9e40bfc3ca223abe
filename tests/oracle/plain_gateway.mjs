#!/usr/bin/env node
// A plain trustless gateway for mxcas integration tests: content made by IPFS's own importer,
// served as raw blocks by several listeners that behave as told.
//
//   node plain_gateway.mjs FILE [--legacy] [--gateway MODE]...
//
// FILE is imported with ipfs-unixfs-importer's default settings (not mxcas's profile:
// 256 KiB chunks), or with --legacy as kubo long did (its unixfs-v0-2015 profile: CIDv0,
// dag-pb leaves, 174 links per node). Each --gateway opens a listener on 127.0.0.1 answering
// GET /ipfs/{cid}?format=raw with the block (application/vnd.ipld.raw):
//   ok            every block, at full speed
//   rate=N        every block, all its connections sharing N bytes/s
//   lie           every block with one byte changed (right length, wrong hash)
//   bad-middle    every block right but the middle one the importer wrote (a leaf), changed
//   stall         takes requests and never answers
//   hold-last     every block at full speed but the last leaf the importer wrote, which it
//                 never answers (a fetch that cannot finish, however long it waits)
//   absent        404 for everything
// An `ok` gateway also answers GET /_matrix/federation/v1/media/download/{root} with the whole
// file as a Matrix federation download (multipart/mixed), as an origin that serves the bytes
// whole in a layout other than mxcas's would.
// Prints the root CID, then one line per gateway: its URL. Runs until stdin closes.
import { createServer } from 'node:http'
import { readFile } from 'node:fs/promises'
import { importer } from 'ipfs-unixfs-importer'
import { CID } from 'multiformats/cid'

const args = process.argv.slice(2)
const file = args.shift()
let legacy = false
const modes = []
while (args.length) {
  const a = args.shift()
  if (a === '--legacy') legacy = true
  else if (a === '--gateway') modes.push(args.shift())
  else throw new Error(`unknown argument ${a}`)
}
if (!file || modes.length === 0) {
  process.stderr.write('usage: node plain_gateway.mjs FILE [--legacy] [--gateway ok|rate=N|lie|stall|absent]...\n')
  process.exit(2)
}

const blocks = new Map()
const order = []
const store = { put (cid, bytes) { blocks.set(cid.toV1().toString(), bytes); order.push(cid.toV1().toString()); return cid } }
const options = legacy ? { profile: 'unixfs-v0-2015' } : {}
const content = await readFile(file)
let root
for await (const entry of importer([{ content }], store, options)) root = entry.cid

function federationDownload (res) {
  const b = 'plaingatewayboundary'
  const head = Buffer.from(`--${b}\r\nContent-Type: application/json\r\n\r\n{}\r\n--${b}\r\nContent-Type: application/octet-stream\r\n\r\n`)
  const tail = Buffer.from(`\r\n--${b}--\r\n`)
  const body = Buffer.concat([head, content, tail])
  res.writeHead(200, { 'content-type': `multipart/mixed; boundary=${b}`, 'content-length': body.length }).end(body)
}

function paced (rate) {
  let nextFree = Date.now()
  return async (res, bytes) => {
    for (let at = 0; at < bytes.length; at += 16384) {
      const chunk = bytes.subarray(at, at + 16384)
      const start = Math.max(Date.now(), nextFree)
      nextFree = start + (chunk.length * 1000) / rate
      const wait = nextFree - Date.now()
      if (wait > 0) await new Promise(resolve => setTimeout(resolve, wait))
      if (!res.write(chunk)) await new Promise(resolve => res.once('drain', resolve))
    }
    res.end()
  }
}

function serve (mode) {
  const send = mode.startsWith('rate=') ? paced(Number(mode.slice(5))) : async (res, bytes) => res.end(bytes)
  return createServer((req, res) => {
    if (mode === 'stall') return
    if (mode === 'ok' && req.url.startsWith(`/_matrix/federation/v1/media/download/${root}`)) return federationDownload(res)
    const m = /^\/ipfs\/([A-Za-z0-9]+)(\?.*)?$/.exec(req.url)
    let key
    try { key = m && CID.parse(m[1]).toV1().toString() } catch { key = undefined }
    const block = key && blocks.get(key)
    if (mode === 'hold-last' && key === order[order.length - 2]) return
    if (mode === 'absent' || !block) {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n')
      return
    }
    let bytes = block
    if (mode === 'lie' || (mode === 'bad-middle' && key === order[order.length >> 1])) {
      bytes = Uint8Array.from(block)
      bytes[bytes.length >> 1] ^= 0x01
    }
    res.writeHead(200, { 'content-type': 'application/vnd.ipld.raw', 'content-length': bytes.length })
    send(res, bytes).catch(() => res.destroy())
  })
}

const urls = []
for (const mode of modes) {
  const server = serve(mode)
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
  urls.push(`http://127.0.0.1:${server.address().port}`)
}
process.stdout.write(`${root}\n${urls.join('\n')}\n`)
process.stdin.resume()
process.stdin.on('end', () => process.exit(0))
