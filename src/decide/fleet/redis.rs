//! The Redis side of fleet limits: one Lua script call per refill, from a background task
//! (never the request path). Each call gives back unused tokens, charges the pod's debt and
//! leases new tokens, atomically.

use std::time::{Duration, SystemTime};

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, Script,
    TlsCertificates,
};

use super::{wall_bucket, FleetGate, Granted};

/// How long a starved mark stays: three polls (`POLL_EVERY` ticks of 10 ms), so every pod,
/// however quiet, sees it at least once.
const STARVED_MARK: Duration = Duration::from_millis(300);

/// ARGV: base key, bucket, buckets, cap, charge, ask, ttl ms, starving (0/1), starved-mark ms,
/// then (bucket, tokens) pairs to give back. Returns {granted, starved (0/1)}.
const REFILL: &str = r"
local base, b, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, charge, ask = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl, starving, mark = tonumber(ARGV[7]), ARGV[8] == '1', tonumber(ARGV[9])
for i = 10, #ARGV, 2 do
  local k = base .. ':' .. ARGV[i]
  if redis.call('EXISTS', k) == 1 then
    if redis.call('DECRBY', k, ARGV[i + 1]) < 0 then redis.call('SET', k, 0, 'KEEPTTL') end
  end
end
local used = 0
for i = b - n + 1, b do
  local v = redis.call('GET', base .. ':' .. i)
  if v then used = used + tonumber(v) end
end
local grant = math.min(ask, math.max(0, cap - used - charge))
if charge + grant > 0 then
  local k = base .. ':' .. b
  redis.call('INCRBY', k, charge + grant)
  redis.call('PEXPIRE', k, ttl)
end
local starved = base .. ':starved'
if starving and grant < ask then redis.call('SET', starved, '1', 'PX', mark) end
return {grant, redis.call('EXISTS', starved)}
";

/// A connection to the fleet's Redis, opened lazily and dropped on any error (the next refill
/// reconnects).
pub struct FleetRedis {
    client: Client,
    conn: Option<MultiplexedConnection>,
    script: Script,
    timeout: Duration,
}

/// TLS material for a `rediss://` URL, as PEM bytes read from files at start.
#[derive(Default)]
pub struct RedisTls {
    /// The CA that signed the server's certificate; `None`: the system's roots.
    pub ca: Option<Vec<u8>>,
    /// Certificate and key for servers that authenticate clients (`tls-auth-clients yes`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl FleetRedis {
    /// `url` as `redis://host:port/db`, or `rediss://` for TLS (verified against `tls.ca` or
    /// the system's roots); `password` (read from a file) overrides one in the URL.
    pub fn open(
        url: &str,
        password: Option<&str>,
        tls: RedisTls,
        timeout: Duration,
    ) -> Result<FleetRedis, redis::RedisError> {
        let mut info = url.into_connection_info()?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let is_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let client = match (is_tls, tls) {
            (true, tls) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: tls.client.map(|(client_cert, client_key)| ClientTlsConfig {
                        client_cert,
                        client_key,
                    }),
                    root_cert: tls.ca,
                },
            )?,
            (
                false,
                RedisTls {
                    ca: None,
                    client: None,
                },
            ) => Client::open(info)?,
            (false, _) => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "TLS files are given but the Redis URL is not rediss://",
                )))
            }
        };
        Ok(FleetRedis {
            client,
            conn: None,
            script: Script::new(REFILL),
            timeout,
        })
    }

    /// Runs the refill `gate` needs now, if any, against the keys under `base`. On an error
    /// the gate goes degraded (and keeps what the refill carried) and the connection is
    /// dropped.
    pub async fn refill(
        &mut self,
        base: &str,
        gate: &FleetGate,
        width: Duration,
        buckets: u32,
    ) -> Result<(), redis::RedisError> {
        let Some(plan) = gate.plan(wall_bucket(SystemTime::now(), width)) else {
            return Ok(());
        };
        let ttl = width
            .saturating_mul(buckets.saturating_add(1))
            .as_millis()
            .max(1);
        let mut call = self.script.prepare_invoke();
        call.arg(base)
            .arg(plan.bucket)
            .arg(buckets.max(1))
            .arg(gate.params().cap)
            .arg(plan.charge)
            .arg(plan.ask)
            .arg(u64::try_from(ttl).unwrap_or(u64::MAX))
            .arg(u8::from(plan.starving))
            .arg(STARVED_MARK.as_millis() as u64);
        for (bucket, tokens) in &plan.returns {
            call.arg(*bucket).arg(*tokens);
        }
        let conn = connect(&self.client, &mut self.conn, self.timeout).await;
        let answer: Result<(u64, u8), _> = match conn {
            Ok(conn) => call.invoke_async(conn).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok((tokens, starved)) => {
                let starved = starved == 1;
                gate.apply(&plan, Granted { tokens, starved });
                Ok(())
            }
            Err(e) => {
                self.conn = None;
                gate.failed(plan);
                Err(e)
            }
        }
    }
}

/// The open connection in `slot`, or a new one.
async fn connect<'a>(
    client: &Client,
    slot: &'a mut Option<MultiplexedConnection>,
    timeout: Duration,
) -> Result<&'a mut MultiplexedConnection, redis::RedisError> {
    let conn = match slot.take() {
        Some(conn) => conn,
        None => {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout));
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?
        }
    };
    Ok(slot.insert(conn))
}
