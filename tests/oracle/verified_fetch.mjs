#!/usr/bin/env node
// node verified_fetch.mjs GATEWAY_URL CID...  → "<cid> <len> <sha256 hex>" per CID
import { createHash } from 'node:crypto'
import { fallbackRouter } from '@helia/fallback-router'
import { trustlessGatewayBlockBroker } from '@helia/trustless-gateway-client'
import { createVerifiedFetchWithHelia } from '@helia/verified-fetch'
import { createHeliaLight } from 'helia'

const [gateway, ...cids] = process.argv.slice(2)
// HTTP only (no libp2p): the gateway under test is the only source of blocks.
// helia 7 asks its default routers before its fallback ones and waits forever when it has
// only fallback ones: the gateway's router is offered as a default router.
const gatewayRouter = fallbackRouter({ gateways: [gateway], shuffle: false })
const helia = createHeliaLight({
  routers: [{ name: 'mxcas-gateway', findProviders: (cid, options) => gatewayRouter.findProviders(cid, options) }],
  blockBrokers: [trustlessGatewayBlockBroker({ allowLocal: true, allowInsecure: true })]
})
await helia.start()
const fetch = await createVerifiedFetchWithHelia(helia)
let failed = false
for (const cid of cids) {
  try {
    const resp = await fetch(`ipfs://${cid}`, { signal: AbortSignal.timeout(60000) })
    if (!resp.ok) throw new Error(`status ${resp.status}: ${await resp.text()}`)
    const bytes = new Uint8Array(await resp.arrayBuffer())
    process.stdout.write(`${cid} ${bytes.length} ${createHash('sha256').update(bytes).digest('hex')}\n`)
  } catch (e) {
    failed = true
    process.stderr.write(`${cid} FAILED ${e?.stack ?? e}\n`)
  }
}
await fetch.stop()
process.exit(failed ? 1 : 0)
