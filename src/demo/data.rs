//! The demo's data: sample `Order` and `Invoice` entities in Koan's SQLite
//! layout (`"Id" TEXT PRIMARY KEY`, `"Json" TEXT`), and the row-by-row
//! comparison of the source with the restored target.
//!
//! The sample is deterministic (a fixed seed): every run generates the same
//! documents, about 300 bytes each, spread over [`TENANTS`] in the
//! `__koan_tenant` field as Koan's shared-row tenancy stores them.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use uuid::Uuid;

/// Rows inserted between two progress updates.
const PROGRESS_EVERY: u64 = 2_000;
/// Differences printed per entity.
pub const EXAMPLES: usize = 5;

/// Tenants: name, currency, country.
const TENANTS: [(&str, &str, &str); 8] = [
    ("acme", "USD", "US"),
    ("globex", "USD", "CA"),
    ("initech", "EUR", "DE"),
    ("umbrella", "GBP", "GB"),
    ("hooli", "EUR", "FR"),
    ("soylent", "EUR", "NL"),
    ("wonka", "CHF", "CH"),
    ("stark", "SEK", "SE"),
];
const COMPANY_WORDS: [&str; 16] = [
    "Northwind",
    "Contoso",
    "Fabrikam",
    "Tailspin",
    "Litware",
    "Adventure",
    "Proseware",
    "Wingtip",
    "Coho",
    "Lucerne",
    "Margie",
    "Alpine",
    "Blue Yonder",
    "Fourth",
    "Trey",
    "Woodgrove",
];
const COMPANY_KINDS: [&str; 6] = ["Traders", "Supplies", "Foods", "Systems", "Works", "Group"];
const PRODUCTS: [(&str, i64); 12] = [
    ("SKU-1001", 2_450),
    ("SKU-1002", 299),
    ("SKU-2040", 875),
    ("SKU-2041", 420),
    ("SKU-3300", 6_900),
    ("SKU-3310", 3_150),
    ("SKU-4100", 1_199),
    ("SKU-4200", 1_890),
    ("SKU-5005", 749),
    ("SKU-5006", 749),
    ("SKU-6010", 1_525),
    ("SKU-7000", 2_200),
];
const ORDER_STATES: [&str; 5] = ["placed", "paid", "shipped", "delivered", "cancelled"];
const INVOICE_STATES: [&str; 3] = ["open", "paid", "overdue"];
/// Customers per tenant.
const CUSTOMERS: u64 = 400;
/// 2024-01-01T00:00:00Z.
const EPOCH: i64 = 1_704_067_200;
/// Documents are spread over 500 days.
const SPAN_SECONDS: i64 = 500 * 86_400;

/// One generated entity.
#[derive(Debug, Clone)]
pub struct Entity {
    /// Entity name in the plan.
    pub name: &'static str,
    /// Its table.
    pub table: &'static str,
    /// Rows generated.
    pub rows: u64,
    /// Bytes of JSON documents generated.
    pub json_bytes: u64,
}

/// What was generated.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `Order`, then `Invoice`.
    pub entities: Vec<Entity>,
}

impl Generated {
    /// Rows in total.
    pub fn rows(&self) -> u64 {
        self.entities.iter().map(|entity| entity.rows).sum()
    }
}

/// Generates `rows` rows into a new database at `path`, with a progress bar
/// on a terminal and a line before and after otherwise.
pub async fn generate_with_progress(path: PathBuf, rows: u64) -> Result<Generated> {
    let bar = progress_bar(rows, "generate");
    if bar.is_hidden() {
        eprintln!("generating {rows} sample rows into {}", path.display());
    }
    let task_bar = bar.clone();
    let generated = tokio::task::spawn_blocking(move || generate(&path, rows, &task_bar))
        .await
        .context("the sample generator stopped")?;
    match &generated {
        Ok(generated) => {
            let summary = generated
                .entities
                .iter()
                .map(|entity| {
                    format!(
                        "{} {} (~{} B each)",
                        entity.rows,
                        entity.table,
                        entity.json_bytes / entity.rows.max(1)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            bar.finish_with_message(format!("done: {summary}"));
            if bar.is_hidden() {
                eprintln!("generated {summary}");
            }
        }
        Err(_) => bar.abandon(),
    }
    generated
}

/// A bar counting rows; hidden (drawing nothing) when stderr is not a terminal.
fn progress_bar(len: u64, prefix: &'static str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_prefix(prefix);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner:.green} {prefix:<8} [{elapsed_precise}] {bar:40.cyan/blue} {human_pos:>9}/{human_len:9} rows {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// SplitMix64: small, fast and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn uuid(&mut self) -> Uuid {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.next().to_le_bytes());
        bytes[8..].copy_from_slice(&self.next().to_le_bytes());
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

#[derive(Serialize)]
struct Customer {
    id: String,
    name: String,
}

#[derive(Serialize)]
struct Line {
    sku: &'static str,
    qty: u32,
    unit_price: f64,
}

#[derive(Serialize)]
struct OrderDoc<'a> {
    #[serde(rename = "__koan_tenant")]
    tenant: &'static str,
    id: &'a str,
    number: String,
    customer: Customer,
    lines: Vec<Line>,
    currency: &'static str,
    total: f64,
    status: &'static str,
    created_at: String,
    updated_at: String,
}

#[derive(Serialize)]
struct InvoiceDoc<'a> {
    #[serde(rename = "__koan_tenant")]
    tenant: &'static str,
    id: &'a str,
    number: String,
    order_id: &'a str,
    customer: Customer,
    currency: &'static str,
    net: f64,
    tax_rate: f64,
    tax: f64,
    gross: f64,
    status: &'static str,
    issued_at: String,
    due_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    paid_at: Option<String>,
}

fn money(cents: i64) -> f64 {
    cents as f64 / 100.0
}

fn timestamp(seconds: i64) -> String {
    DateTime::<Utc>::from_timestamp(seconds, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Customer `number` of `tenant`.
fn customer(tenant: usize, number: usize) -> Customer {
    Customer {
        id: format!("CUS-{}-{number:04}", TENANTS[tenant].2),
        name: format!(
            "{} {}",
            COMPANY_WORDS[number % COMPANY_WORDS.len()],
            COMPANY_KINDS[(number / COMPANY_WORDS.len()) % COMPANY_KINDS.len()]
        ),
    }
}

/// Creates the tables and inserts the rows, in one transaction.
fn generate(path: &Path, rows: u64, bar: &ProgressBar) -> Result<Generated> {
    let orders = (rows * 2).div_ceil(3);
    let invoices = rows - orders;
    let mut connection =
        Connection::open(path).with_context(|| format!("creating {}", path.display()))?;
    connection
        .execute_batch(
            r#"PRAGMA synchronous = OFF;
               CREATE TABLE "Order" ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL);
               CREATE TABLE "Invoice" ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL);"#,
        )
        .with_context(|| format!("creating the tables of {}", path.display()))?;
    let transaction = connection
        .transaction()
        .with_context(|| format!("starting the insert into {}", path.display()))?;
    let mut rng = Rng(0x6B6F_616E_6465_6D6F);
    let mut order_refs = Vec::with_capacity(orders as usize);
    let mut order_bytes = 0u64;
    let mut invoice_bytes = 0u64;
    {
        let mut insert = transaction
            .prepare(r#"INSERT INTO "Order" ("Id", "Json") VALUES (?1, ?2)"#)
            .context("preparing the Order insert")?;
        for index in 0..orders {
            let id = rng.uuid().to_string();
            let tenant = rng.below(TENANTS.len() as u64) as usize;
            let (tenant_name, currency, _) = TENANTS[tenant];
            let customer_number = rng.below(CUSTOMERS) as usize;
            let lines: Vec<Line> = (0..1 + rng.below(2))
                .map(|_| {
                    let (sku, price) = rng.pick(&PRODUCTS);
                    Line {
                        sku,
                        qty: 1 + rng.below(12) as u32,
                        unit_price: money(price),
                    }
                })
                .collect();
            let total_cents: i64 = lines
                .iter()
                .map(|line| (line.unit_price * 100.0).round() as i64 * i64::from(line.qty))
                .sum();
            let created = EPOCH + rng.below(SPAN_SECONDS as u64) as i64;
            let document = OrderDoc {
                tenant: tenant_name,
                id: &id,
                number: format!("SO-{}-{:07}", tenant_name.to_uppercase(), index + 1),
                customer: customer(tenant, customer_number),
                lines,
                currency,
                total: money(total_cents),
                status: rng.pick(&ORDER_STATES),
                created_at: timestamp(created),
                updated_at: timestamp(created + rng.below(14 * 86_400) as i64),
            };
            let json = serde_json::to_string(&document).context("encoding an Order")?;
            order_bytes += json.len() as u64;
            insert
                .execute((&id, &json))
                .with_context(|| format!("inserting Order {id}"))?;
            order_refs.push((id, tenant, customer_number, total_cents, created));
            if (index + 1) % PROGRESS_EVERY == 0 {
                bar.set_position(index + 1);
            }
        }
    }
    {
        let mut insert = transaction
            .prepare(r#"INSERT INTO "Invoice" ("Id", "Json") VALUES (?1, ?2)"#)
            .context("preparing the Invoice insert")?;
        for index in 0..invoices {
            let id = rng.uuid().to_string();
            // Invoices go to orders spread evenly over all of them.
            let (order_id, tenant, customer_number, net, ordered) =
                &order_refs[(index * orders / invoices.max(1)) as usize];
            let (tenant_name, currency, _) = TENANTS[*tenant];
            let tax_rate = [0.0, 7.0, 19.0, 20.0, 25.0][*tenant % 5];
            let tax = (*net as f64 * tax_rate / 100.0).round() as i64;
            let issued = ordered + rng.below(3 * 86_400) as i64;
            let status = rng.pick(&INVOICE_STATES);
            let document = InvoiceDoc {
                tenant: tenant_name,
                id: &id,
                number: format!("INV-{}-{:07}", tenant_name.to_uppercase(), index + 1),
                order_id,
                customer: customer(*tenant, *customer_number),
                currency,
                net: money(*net),
                tax_rate,
                tax: money(tax),
                gross: money(net + tax),
                status,
                issued_at: timestamp(issued),
                due_at: timestamp(issued + 30 * 86_400),
                paid_at: (status == "paid")
                    .then(|| timestamp(issued + rng.below(30 * 86_400) as i64)),
            };
            let json = serde_json::to_string(&document).context("encoding an Invoice")?;
            invoice_bytes += json.len() as u64;
            insert
                .execute((&id, &json))
                .with_context(|| format!("inserting Invoice {id}"))?;
            if (index + 1) % PROGRESS_EVERY == 0 {
                bar.set_position(orders + index + 1);
            }
        }
    }
    transaction
        .commit()
        .with_context(|| format!("committing the sample into {}", path.display()))?;
    bar.set_position(rows);
    Ok(Generated {
        entities: vec![
            Entity {
                name: "Order",
                table: "Order",
                rows: orders,
                json_bytes: order_bytes,
            },
            Entity {
                name: "Invoice",
                table: "Invoice",
                rows: invoices,
                json_bytes: invoice_bytes,
            },
        ],
    })
}

/// How the target's rows of one entity compare with the source's.
#[derive(Debug)]
pub struct Comparison {
    /// The entity.
    pub entity: &'static str,
    /// Rows in the source.
    pub source_rows: u64,
    /// Rows in the target.
    pub target_rows: u64,
    /// Keys missing, extra, or with another document.
    pub differences: u64,
    /// The first few differences, described.
    pub examples: Vec<String>,
}

/// Compares every row of every entity, with a bar on a terminal.
pub async fn compare_with_progress(
    source: PathBuf,
    target: PathBuf,
    entities: Vec<Entity>,
) -> Result<Vec<Comparison>> {
    let total = entities.iter().map(|entity| entity.rows).sum();
    let bar = progress_bar(total, "compare");
    let task_bar = bar.clone();
    let compared = tokio::task::spawn_blocking(move || {
        let mut comparisons = Vec::new();
        for entity in &entities {
            comparisons.push(compare(&source, &target, entity, &task_bar)?);
        }
        Ok::<_, anyhow::Error>(comparisons)
    })
    .await
    .context("the comparison stopped")?;
    match &compared {
        Ok(_) => bar.finish_with_message("done"),
        Err(_) => bar.abandon(),
    }
    compared
}

fn open_read_only(path: &Path) -> Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening {}", path.display()))
}

impl Comparison {
    fn differ(&mut self, text: String) {
        self.differences += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(text);
        }
    }
}

/// The next `(Id, Json)` of a query.
fn fetch(
    rows: &mut rusqlite::Rows<'_>,
    table: &str,
    path: &Path,
) -> Result<Option<(String, String)>> {
    let row = rows
        .next()
        .with_context(|| format!("reading {table} from {}", path.display()))?;
    row.map(|row| -> rusqlite::Result<(String, String)> { Ok((row.get(0)?, row.get(1)?)) })
        .transpose()
        .with_context(|| format!("decoding a {table} row of {}", path.display()))
}

/// Reads both tables in key order and walks them side by side.
fn compare(source: &Path, target: &Path, entity: &Entity, bar: &ProgressBar) -> Result<Comparison> {
    let source_db = open_read_only(source)?;
    let target_db = open_read_only(target)?;
    let query = format!(
        r#"SELECT "Id", "Json" FROM "{}" ORDER BY "Id""#,
        entity.table
    );
    let mut source_statement = source_db
        .prepare(&query)
        .with_context(|| format!("reading {} from {}", entity.table, source.display()))?;
    let mut target_statement = target_db
        .prepare(&query)
        .with_context(|| format!("reading {} from {}", entity.table, target.display()))?;
    let mut source_rows = source_statement
        .query([])
        .with_context(|| format!("reading {} from {}", entity.table, source.display()))?;
    let mut target_rows = target_statement
        .query([])
        .with_context(|| format!("reading {} from {}", entity.table, target.display()))?;
    let mut comparison = Comparison {
        entity: entity.name,
        source_rows: 0,
        target_rows: 0,
        differences: 0,
        examples: Vec::new(),
    };
    let next = |rows: &mut rusqlite::Rows<'_>, path: &Path| fetch(rows, entity.table, path);
    let mut left = next(&mut source_rows, source)?;
    let mut right = next(&mut target_rows, target)?;
    loop {
        match (&left, &right) {
            (None, None) => break,
            (Some((key, _)), None) => {
                comparison.differ(format!("{key}: missing from the target"));
                comparison.source_rows += 1;
                left = next(&mut source_rows, source)?;
            }
            (None, Some((key, _))) => {
                comparison.differ(format!("{key}: only in the target"));
                comparison.target_rows += 1;
                right = next(&mut target_rows, target)?;
            }
            (Some((source_key, source_doc)), Some((target_key, target_doc))) => {
                match source_key.cmp(target_key) {
                    std::cmp::Ordering::Less => {
                        comparison.differ(format!("{source_key}: missing from the target"));
                        comparison.source_rows += 1;
                        left = next(&mut source_rows, source)?;
                    }
                    std::cmp::Ordering::Greater => {
                        comparison.differ(format!("{target_key}: only in the target"));
                        comparison.target_rows += 1;
                        right = next(&mut target_rows, target)?;
                    }
                    std::cmp::Ordering::Equal => {
                        if source_doc != target_doc && !same_json(source_doc, target_doc) {
                            comparison.differ(format!("{source_key}: the document differs"));
                        }
                        comparison.source_rows += 1;
                        comparison.target_rows += 1;
                        if comparison.source_rows.is_multiple_of(PROGRESS_EVERY) {
                            bar.inc(PROGRESS_EVERY);
                        }
                        left = next(&mut source_rows, source)?;
                        right = next(&mut target_rows, target)?;
                    }
                }
            }
        }
    }
    bar.inc(comparison.source_rows % PROGRESS_EVERY);
    if comparison.source_rows != entity.rows {
        bail!(
            "{} in {} holds {} rows, but {} were generated",
            entity.table,
            source.display(),
            comparison.source_rows,
            entity.rows
        );
    }
    Ok(comparison)
}

/// Whether two documents are the same JSON value (whitespace and number
/// spelling aside); text that does not parse is equal only to itself.
fn same_json(left: &str, right: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(left),
        serde_json::from_str::<serde_json::Value>(right),
    ) {
        (Ok(left), Ok(right)) => left == right,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_comparison_ignores_spacing_only() {
        assert!(same_json(
            r#"{"a":1,"b":[1,2]}"#,
            r#"{ "b": [1, 2], "a": 1 }"#
        ));
        assert!(!same_json(r#"{"a":1}"#, r#"{"a":2}"#));
        assert!(!same_json("not json", "not json "));
    }

    #[test]
    fn documents_are_about_300_bytes() {
        let dir = std::env::temp_dir().join(format!("koan-demo-data-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let generated = generate(&dir.join("s.db"), 3_000, &ProgressBar::hidden()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(generated.rows(), 3_000);
        assert_eq!(generated.entities[0].rows, 2_000);
        for entity in &generated.entities {
            let average = entity.json_bytes / entity.rows;
            assert!((250..=450).contains(&average), "{}: {average}", entity.name);
        }
    }
}
